/**
 * Topology of a single-node driver: every volume is reachable from the node that holds it, and from no
 * other, so a volume's accessible_topology is exactly this node's segment.
 */
import { create } from '@bufbuild/protobuf';
import { TOPOLOGY_NODE_KEY, type DriverConfig } from '../config.js';
import { type Topology, type TopologyRequirement, TopologySchema } from '../gen/csi/v1/csi_pb.js';

/** This node's topology: `{TOPOLOGY_NODE_KEY: nodeId}`. */
export function nodeTopology(config: DriverConfig): Topology {
  return create(TopologySchema, { segments: { [TOPOLOGY_NODE_KEY]: config.nodeId } });
}

/** Whether a topology describes this node: each of its segments is one of ours, with our value. */
export function isThisNode(topology: Topology, config: DriverConfig): boolean {
  const ours: Record<string, string> = { [TOPOLOGY_NODE_KEY]: config.nodeId };
  const entries = Object.entries(topology.segments);
  return entries.length > 0 && entries.every(([key, value]) => ours[key] === value);
}

/**
 * Whether a volume on this node satisfies a CreateVolume accessibility requirement. Only `requisite`
 * binds: the spec lets the plugin choose any topology when none of the preferred ones can be used and
 * no requisite list is given.
 */
export function satisfiesRequirement(requirement: TopologyRequirement | undefined, config: DriverConfig): boolean {
  if (!requirement || requirement.requisite.length === 0) return true;
  return requirement.requisite.some((t) => isThisNode(t, config));
}
