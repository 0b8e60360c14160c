"""Comparing foundation models through their embeddings: probes, retrieval, anomalies."""
