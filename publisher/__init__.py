"""keyrelay publisher: the source of truth for keys, its admin API, and the outbox into JetStream.

Import what you need from its modules (`publisher.app`, `publisher.settings`, ...): the package
itself exports nothing, so importing `publisher.errors` or `publisher.settings`, as the `keyrelay`
command does to build its parser, loads no store.
"""

__all__: list[str] = []
