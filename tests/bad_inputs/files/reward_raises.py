def fails(prompts, completions, reference, **columns):
    """A user's reward with a bug: it cannot handle one of the references."""
    return [1.0 / (len(r) - 1) for r in reference]
