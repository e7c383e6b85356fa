"""The kvtier cache server (`kvtier serve`): protocol, asyncio service, auth and metrics."""
