#!/bin/bash
# sbatch accelerate_configs/slurm_multi_node.sh RECIPE [--key value ...]
#
# llmft on several Slurm nodes: one `accelerate launch` per node (srun), each starting one process per GPU.
# Preemption: Slurm sends SIGTERM 120 s before the end (--signal); llmft saves a checkpoint at the next step and
# exits with 143, and `--requeue` starts the job again, which resumes from that checkpoint
# (training.resume_from_checkpoint: auto). Give the recipe a fixed training.output_dir on shared storage.
#SBATCH --job-name=llmft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${CONFIG:-accelerate_configs/multi_node.yaml}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# Forward Slurm's SIGTERM to the launchers, which pass it to the training processes.
trap 'kill -TERM $(jobs -p) 2>/dev/null' TERM

srun --kill-on-bad-exit=1 bash -c "accelerate launch --config_file $CONFIG \
    --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_IP --main_process_port 29500 \
    -m llmft train $*" &
wait
