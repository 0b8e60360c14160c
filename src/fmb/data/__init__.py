"""Data foundation: file formats (tables, HDF5, images), survey schemas and readers (`surveys`), hold-out
splits, and synthetic generators writing the survey formats (`synth`)."""
