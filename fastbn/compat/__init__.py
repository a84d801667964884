"""Drop-in wrappers with the conventions of other code bases."""
