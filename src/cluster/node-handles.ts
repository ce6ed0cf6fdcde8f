/**
 * Handles that name their owner. With peers configured, the CSI handle of every volume, snapshot and group
 * snapshot is `<engine id>@<node id>` (docs/adr/0008): whoever receives it knows which node's store holds
 * the object. A handle without a valid `@<node id>` suffix is local: the engine's own ID (single mode, and
 * stores from before peers were configured), answered by the node that receives it.
 */

/** Separates the engine's ID from the owner's node ID; never part of either. */
export const OWNER_SEPARATOR = '@';

/**
 * Node IDs that can own handles: Kubernetes node names fit (RFC 1123 labels and dots). At most 100 bytes, so
 * that the longest handle (`group-` + 16 hex digits, `@`, node) stays within CSI's 128-byte ID limit.
 */
const OWNER_NODE_ID = /^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9])?$/;

/** Why `nodeId` cannot own handles, or undefined if it can. */
export function ownerNodeIdProblem(nodeId: string): string | undefined {
  if (OWNER_NODE_ID.test(nodeId)) return undefined;
  return `node ID ${JSON.stringify(nodeId)} cannot be put in volume and snapshot handles: with peers it must be 1 to 100 characters of A-Z, a-z, 0-9, '.', '_' and '-', starting and ending with a letter or digit`;
}

/** The node that owns `handle`, or undefined for a local handle (no valid owner suffix). */
export function ownerOf(handle: string): string | undefined {
  const at = handle.lastIndexOf(OWNER_SEPARATOR);
  if (at <= 0) return undefined;
  const node = handle.slice(at + 1);
  return OWNER_NODE_ID.test(node) ? node : undefined;
}

/** The engine's ID inside a handle owned by `node`; other handles are returned unchanged. */
export function withoutOwner(handle: string, node: string): string {
  return ownerOf(handle) === node ? handle.slice(0, handle.length - node.length - 1) : handle;
}

/** The handle of the engine's object `id` on `node`. */
export function ownedHandle(id: string, node: string): string {
  return `${id}${OWNER_SEPARATOR}${node}`;
}
