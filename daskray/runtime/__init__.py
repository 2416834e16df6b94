"""The processes and plumbing: head loop, worker loop, client, transport, serialization."""
