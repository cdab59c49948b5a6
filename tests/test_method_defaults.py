"""Defaults that come from a paper or a seed project: a change must be deliberate."""

from kvbench.methods import REGISTRY


def test_stream_quant_defaults_are_the_seeds():
    m = REGISTRY["stream_quant"]()
    assert (m.outlier_threshold_relative, m.ema_decay, m.attention_sink_size) == (3.0, 0.9, 4)
    assert (m.key_bits_normal, m.value_bits_normal, m.key_bits_sink_outlier, m.value_bits_sink_outlier) == (4, 4, 8, 8)
