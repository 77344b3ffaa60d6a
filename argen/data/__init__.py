"""Datasets: the built-in shapes world, image folders, WebDataset shards and pre-extracted code shards."""
