"""Binary analysis: what the agent reads from the target's executable before it places probes."""
