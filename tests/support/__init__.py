"""Test support shared by the test modules: polling, the daemon as a process, the mirror oracle,
wire helpers, a scripted PLC + PDS world and Kafka helpers. Test modules import from here, never
from each other. (The real local servers live beside it: tests/relay.py, tests/faultserver.py,
tests/kafka.py, tests/network, tests/oracle.py.)"""
