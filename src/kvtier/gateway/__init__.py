"""The OpenAI-compatible service layer: `kvtier gateway` in front of inference workers
(routing by expected TTFT, sessions through the Responses API) and `kvtier worker-sim`."""
