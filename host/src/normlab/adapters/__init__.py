"""Small documented adapters for libraries that are broken as installed here (see each module)."""
