import json
import ray

ray.init(address="auto", logging_level="ERROR", log_to_driver=False, configure_logging=False)
nodes = [
    {"ip": n.get("NodeManagerAddress"), "alive": bool(n.get("Alive")), "resources": n.get("Resources", {})}
    for n in ray.nodes()
]
print("SPARK_CLUSTER_RAY_NODES " + json.dumps(nodes))
