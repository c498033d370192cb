"""The bundled model: a small trained Qwen3-VL-MoE and the synthetic benchmark it was trained on."""
