"""Test support: everything the test modules share. Test modules import from here, never from
each other.

- wait: polling instead of fixed sleeps, free loopback ports
- daemon: `skyfill consume` as a process; mirror: consuming a local relay into a store
- wire: frame/varint helpers; topics: Kafka topic helpers; served: a scripted PLC + PDS world
- relay: a local subscribeRepos WebSocket; faultserver: a scripted HTTP server for PLC/PDS faults
- kafka: a local Kafka-protocol broker (`python -m tests.support.kafka up|down`)
- network: the local reference PDS + PLC (`python -m tests.support.network install|up`)
- oracle: the mirror compared with what the PDS serves (getRepo walked independently)
- generate: deterministic generated worlds (identities, signed repos, firehose frames)
"""
