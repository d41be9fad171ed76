"""Plumbing shared by every service: sockets, logging, process lifecycle."""
