"""fleet: rolls model variants out to nodes and collects telemetry over MQTT.

Never imports torch: it handles artifacts as files and manifests, nodes as MQTT peers.
"""
