"""The daily re-engagement audience: episodes, due steps, exclusions, holdout and variants."""
