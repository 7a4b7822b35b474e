"""Tests for megakto.data.packing and megakto.kto.segment_logps."""
