"""Splunk HTTP Event Collector sink for eventrouter: an example of a third-party sink plugin."""

from eventrouter_splunk_hec.sink import SplunkHECOptions, SplunkHECSink

__all__ = ["SplunkHECOptions", "SplunkHECSink"]
