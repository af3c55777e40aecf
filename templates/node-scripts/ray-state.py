# Runs inside the Ray head container (python3 -c): Ray's own view of the cluster as JSON lines,
# read by spark_cluster.facts.parse_ray_state. Nodes with their resources, placement groups with
# the node of each bundle, and live actors.
import json

import ray

ray.init(address="auto", logging_level="ERROR", log_to_driver=False, configure_logging=False)
ip_of = {}
nodes = []
for n in ray.nodes():
    ip_of[n.get("NodeID")] = n.get("NodeManagerAddress")
    nodes.append({"ip": n.get("NodeManagerAddress"), "alive": bool(n.get("Alive")), "resources": n.get("Resources", {})})
print("SPARK_CLUSTER_RAY_NODES " + json.dumps(nodes))
try:
    from ray.util import placement_group_table

    pgs = []
    for pg_id, pg in placement_group_table().items():
        bundles = pg.get("bundles", {})
        where = pg.get("bundles_to_node_id", {})
        pgs.append({"id": pg_id, "name": pg.get("name", ""), "state": pg.get("state"), "strategy": pg.get("strategy"),
                    "bundles": [{"resources": bundles[i], "ip": ip_of.get(where.get(i))} for i in sorted(bundles)]})
    print("SPARK_CLUSTER_RAY_PGS " + json.dumps(pgs))
except Exception as exc:  # an older Ray: the nodes are what matters most
    print("SPARK_CLUSTER_RAY_PGS_ERROR " + json.dumps(repr(exc)))
try:
    from ray._private.state import actors

    live = [{"id": actor_id, "class": a.get("ActorClassName"), "state": a.get("State"),
             "ip": (a.get("Address") or {}).get("IPAddress"), "pid": a.get("Pid")}
            for actor_id, a in actors().items() if a.get("State") != "DEAD"]
    print("SPARK_CLUSTER_RAY_ACTORS " + json.dumps(live))
except Exception as exc:
    print("SPARK_CLUSTER_RAY_ACTORS_ERROR " + json.dumps(repr(exc)))
