/**
 * Volume capabilities this driver can honour. Every volume lives on one node, so only the SINGLE_NODE_*
 * access modes can be satisfied; block and mount access are both served by the node data plane.
 */
import { Code } from '@connectrpc/connect';
import { type VolumeCapability, VolumeCapability_AccessMode_Mode as Mode } from '../gen/csi/v1/csi_pb.js';
import { rpcError } from '../rpc/status.js';

/** Filesystems the node plugin can make; '' (unspecified) means the first. */
export const SUPPORTED_FS_TYPES: readonly string[] = ['ext4', 'xfs'];

/** Access modes a single-node volume can satisfy. */
export const SUPPORTED_ACCESS_MODES: readonly Mode[] = [
  Mode.SINGLE_NODE_WRITER,
  Mode.SINGLE_NODE_READER_ONLY,
  Mode.SINGLE_NODE_SINGLE_WRITER,
  Mode.SINGLE_NODE_MULTI_WRITER,
];

/**
 * Why a capability cannot be honoured. `malformed`: the message breaks the spec's own rules (a required
 * field is missing), which is INVALID_ARGUMENT everywhere. `unsupported`: a valid request this driver
 * cannot satisfy, which some RPCs answer without an error (ValidateVolumeCapabilities, GetCapacity).
 */
export interface CapabilityProblem {
  kind: 'malformed' | 'unsupported';
  message: string;
}

/** The first problem with one capability, or undefined if this driver supports it. */
export function capabilityProblem(cap: VolumeCapability, field: string): CapabilityProblem | undefined {
  const access = cap.accessType;
  if (access.case === undefined) {
    return { kind: 'malformed', message: `${field}: access_type (block or mount) is required` };
  }
  const mode = cap.accessMode?.mode ?? Mode.UNKNOWN;
  if (mode === Mode.UNKNOWN) {
    return { kind: 'malformed', message: `${field}: access_mode.mode is required` };
  }
  if (!SUPPORTED_ACCESS_MODES.includes(mode)) {
    const name = Mode[mode] ?? String(mode);
    return {
      kind: 'unsupported',
      message: `${field}: access mode ${name} is not supported: volumes live on one node (SINGLE_NODE_* modes only)`,
    };
  }
  if (access.case === 'mount' && access.value.fsType !== '' && !SUPPORTED_FS_TYPES.includes(access.value.fsType)) {
    return {
      kind: 'unsupported',
      message: `${field}: fs_type ${JSON.stringify(access.value.fsType.slice(0, 64))} is not supported (${SUPPORTED_FS_TYPES.join(', ')})`,
    };
  }
  return undefined;
}

/** The first problem in a list of capabilities, or undefined if all are supported. */
export function firstCapabilityProblem(
  caps: readonly VolumeCapability[],
  field = 'volume_capabilities',
): CapabilityProblem | undefined {
  let unsupported: CapabilityProblem | undefined;
  for (const [i, cap] of caps.entries()) {
    const problem = capabilityProblem(cap, `${field}[${i}]`);
    // A malformed entry anywhere outranks an unsupported one: the request itself is wrong.
    if (problem?.kind === 'malformed') return problem;
    unsupported ??= problem;
  }
  return unsupported;
}

/** Throws INVALID_ARGUMENT unless the list is non-empty and every capability is supported. */
export function requireSupportedCapabilities(caps: readonly VolumeCapability[], field = 'volume_capabilities'): void {
  if (caps.length === 0) throw rpcError(Code.InvalidArgument, `${field} is required`);
  const problem = firstCapabilityProblem(caps, field);
  if (problem) throw rpcError(Code.InvalidArgument, problem.message);
}

/** Throws INVALID_ARGUMENT for a malformed capability; returns the first unsupported one's message. */
export function unsupportedCapability(
  caps: readonly VolumeCapability[],
  field = 'volume_capabilities',
): string | undefined {
  const problem = firstCapabilityProblem(caps, field);
  if (problem?.kind === 'malformed') throw rpcError(Code.InvalidArgument, problem.message);
  return problem?.message;
}
