"""Test servers that keep the real contract of destinations with no server available here."""
