"""Engine integrations; each module imports its engine only when imported itself."""
