"""Engines behind small interfaces: generation (vLLM, HF), training (DeepSpeed, torch), weight-sync transports.

Engines never import roles; roles never learn which engine they hold.
"""
