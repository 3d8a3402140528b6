"""Record bytes -> event object, or the reason it is not one: the data contract's decoder (one owner)."""

from training.contract import decode_event as decode
from training.contract import decode_events

__all__ = ["decode", "decode_events"]
