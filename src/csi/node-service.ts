/**
 * CSI Node: what kubelet calls on the node that runs the pod. A thin adapter: it checks what the spec
 * makes the plugin's job (required fields, absolute paths, capabilities) and turns a request into a call
 * on the node data plane (src/dataplane/node-volumes.ts), whose NodeErrors become the spec's codes here.
 */
import path from 'node:path';
import { create } from '@bufbuild/protobuf';
import { Code, type ServiceImpl } from '@connectrpc/connect';
import type { NodeVolumes } from '../dataplane/node-volumes.js';
import type { StagedAccess } from '../dataplane/stage-records.js';
import {
  type Node,
  NodeServiceCapability_RPC_Type as RpcType,
  NodeServiceCapabilitySchema,
  type VolumeCapability,
  VolumeCapability_AccessMode_Mode as Mode,
  VolumeUsage_Unit,
  VolumeUsageSchema,
} from '../gen/csi/v1/csi_pb.js';
import { rpcError, translateNodeErrors as translate } from '../rpc/status.js';
import { capabilityProblem } from './capabilities.js';
import { checkCapacityRange } from './capacity-range.js';
import type { DriverContext } from './driver-context.js';
import { nodeTopology } from './topology.js';

/** What NodeGetCapabilities advertises; each one is implemented below. */
export const NODE_CAPABILITIES: readonly RpcType[] = [
  RpcType.STAGE_UNSTAGE_VOLUME,
  RpcType.GET_VOLUME_STATS,
  RpcType.EXPAND_VOLUME,
  RpcType.VOLUME_CONDITION,
  RpcType.SINGLE_NODE_MULTI_WRITER,
];

/** Longest path accepted: Linux's PATH_MAX (the spec asks for at least 128 bytes). */
const MAX_PATH_BYTES = 4096;
/** Longest component of a path: Linux's NAME_MAX. */
const MAX_NAME_BYTES = 255;

export function nodeService(ctx: DriverContext, volumes: NodeVolumes): ServiceImpl<typeof Node> {
  const { config } = ctx;
  return {
    async nodeStageVolume(req) {
      const volumeId = requireVolumeId(req.volumeId);
      const stagingPath = requirePath(req.stagingTargetPath, 'staging_target_path');
      const cap = requireCapability(req.volumeCapability, 'volume_capability', Code.FailedPrecondition);
      await translate(() =>
        volumes.stage({
          volumeId,
          stagingPath,
          access: cap.access,
          accessMode: cap.mode,
          readOnly: cap.mode === Mode.SINGLE_NODE_READER_ONLY,
          capabilityKey: cap.key,
        }),
      );
      return {};
    },

    async nodeUnstageVolume(req) {
      const volumeId = requireVolumeId(req.volumeId);
      const stagingPath = requirePath(req.stagingTargetPath, 'staging_target_path');
      await translate(() => volumes.unstage(volumeId, stagingPath));
      return {};
    },

    async nodePublishVolume(req) {
      const volumeId = requireVolumeId(req.volumeId);
      const targetPath = requirePath(req.targetPath, 'target_path');
      const cap = requireCapability(req.volumeCapability, 'volume_capability', Code.FailedPrecondition);
      // STAGE_UNSTAGE_VOLUME is advertised, so publishing without a staging path is the CO's mistake.
      if (!req.stagingTargetPath)
        throw rpcError(Code.FailedPrecondition, 'staging_target_path is required (the volume must be staged first)');
      const stagingPath = requirePath(req.stagingTargetPath, 'staging_target_path');
      if (targetPath === stagingPath)
        throw rpcError(Code.InvalidArgument, 'target_path must differ from staging_target_path');
      await translate(() =>
        volumes.publish({
          volumeId,
          stagingPath,
          targetPath,
          accessKind: cap.access.kind,
          accessMode: cap.mode,
          readonly: req.readonly || cap.mode === Mode.SINGLE_NODE_READER_ONLY,
          capabilityKey: cap.key,
          exclusive: cap.mode === Mode.SINGLE_NODE_SINGLE_WRITER,
        }),
      );
      return {};
    },

    async nodeUnpublishVolume(req) {
      const volumeId = requireVolumeId(req.volumeId);
      const targetPath = requirePath(req.targetPath, 'target_path');
      await translate(() => volumes.unpublish(volumeId, targetPath));
      return {};
    },

    async nodeGetVolumeStats(req) {
      const volumeId = requireVolumeId(req.volumeId);
      const volumePath = requireVolumePath(req.volumePath);
      if (req.stagingTargetPath) requirePath(req.stagingTargetPath, 'staging_target_path');
      const stats = await translate(() => volumes.stats(volumeId, volumePath));
      const usage = [];
      if (stats.usage) {
        const u = stats.usage;
        usage.push(
          create(VolumeUsageSchema, {
            unit: VolumeUsage_Unit.BYTES,
            total: BigInt(u.totalBytes),
            available: BigInt(u.availableBytes),
            used: BigInt(u.usedBytes),
          }),
          create(VolumeUsageSchema, {
            unit: VolumeUsage_Unit.INODES,
            total: BigInt(u.totalInodes),
            available: BigInt(u.availableInodes),
            used: BigInt(u.usedInodes),
          }),
        );
      } else if (stats.kind === 'block') {
        // A raw device has no notion of used space; the spec lets block volumes report the total only.
        usage.push(create(VolumeUsageSchema, { unit: VolumeUsage_Unit.BYTES, total: BigInt(stats.capacityBytes) }));
      }
      return { usage, volumeCondition: stats.condition };
    },

    async nodeExpandVolume(req) {
      const volumeId = requireVolumeId(req.volumeId);
      const volumePath = requireVolumePath(req.volumePath);
      if (req.stagingTargetPath) requirePath(req.stagingTargetPath, 'staging_target_path');
      const range = checkCapacityRange(req.capacityRange);
      // Exceeding capabilities is INVALID_ARGUMENT for this RPC (not FAILED_PRECONDITION as for stage/publish).
      if (req.volumeCapability) requireCapability(req.volumeCapability, 'volume_capability', Code.InvalidArgument);
      const capacityBytes = await translate(() => volumes.expand(volumeId, volumePath, range.requiredBytes));
      return { capacityBytes: BigInt(capacityBytes) };
    },

    nodeGetCapabilities() {
      return {
        capabilities: NODE_CAPABILITIES.map((type) =>
          create(NodeServiceCapabilitySchema, { type: { case: 'rpc', value: { type } } }),
        ),
      };
    },

    nodeGetInfo() {
      return {
        nodeId: config.nodeId,
        maxVolumesPerNode: BigInt(config.maxVolumesPerNode ?? 0),
        accessibleTopology: nodeTopology(config),
      };
    },
  };
}

function requireVolumeId(value: string): string {
  if (!value) throw rpcError(Code.InvalidArgument, 'volume_id is required');
  return value;
}

/** A required absolute path, normalised ("/a//b/" and "/a/b" are the same place). */
function requirePath(value: string, field: string): string {
  if (!value) throw rpcError(Code.InvalidArgument, `${field} is required`);
  if (value.includes('\0')) throw rpcError(Code.InvalidArgument, `${field} contains a NUL byte`);
  if (Buffer.byteLength(value) > MAX_PATH_BYTES)
    throw rpcError(Code.InvalidArgument, `${field} is longer than ${MAX_PATH_BYTES} bytes`);
  if (!path.isAbsolute(value)) throw rpcError(Code.InvalidArgument, `${field} must be an absolute path`);
  if (value.split('/').some((name) => Buffer.byteLength(name) > MAX_NAME_BYTES))
    throw rpcError(Code.InvalidArgument, `${field} has a component longer than ${MAX_NAME_BYTES} bytes`);
  return path.resolve(value);
}

/**
 * volume_path of NodeGetVolumeStats and NodeExpandVolume: required, but a path that is not absolute is
 * answered like any other path where the volume is not (NOT_FOUND, the only error those RPCs' tables
 * name for a path), which is also what csi-sanity expects.
 */
function requireVolumePath(value: string): string {
  if (!value) throw rpcError(Code.InvalidArgument, 'volume_path is required');
  if (!path.isAbsolute(value))
    throw rpcError(Code.NotFound, 'volume_path is not absolute, so no volume is staged or published there');
  return requirePath(value, 'volume_path');
}

interface ParsedCapability {
  access: StagedAccess;
  mode: Mode;
  /** Same key, same capability: what idempotent repeats compare. */
  key: string;
}

/**
 * A capability the node can honour. Malformed (no access type or mode): INVALID_ARGUMENT. Valid but not
 * supported (a MULTI_NODE mode, an unknown fs_type): `unsupported`, which the spec makes
 * FAILED_PRECONDITION for stage and publish and INVALID_ARGUMENT for expand.
 */
function requireCapability(cap: VolumeCapability | undefined, field: string, unsupported: Code): ParsedCapability {
  if (!cap) throw rpcError(Code.InvalidArgument, `${field} is required`);
  const problem = capabilityProblem(cap, field);
  if (problem) throw rpcError(problem.kind === 'malformed' ? Code.InvalidArgument : unsupported, problem.message);
  const mode = cap.accessMode!.mode;
  const type = cap.accessType;
  let access: StagedAccess;
  if (type.case === 'mount') {
    const flags = type.value.mountFlags;
    for (const flag of flags) {
      if (!flag || /[\s,\0]/.test(flag)) {
        throw rpcError(
          Code.InvalidArgument,
          `${field}.mount.mount_flags: ${JSON.stringify(flag.slice(0, 64))} is not a mount option`,
        );
      }
    }
    if (type.value.volumeMountGroup) {
      throw rpcError(
        Code.InvalidArgument,
        `${field}.mount.volume_mount_group is not supported (no VOLUME_MOUNT_GROUP capability)`,
      );
    }
    access = { kind: 'mount', fsType: type.value.fsType, mountFlags: [...flags] };
  } else {
    access = { kind: 'block' };
  }
  const key = JSON.stringify(
    access.kind === 'mount' ? ['mount', access.fsType, access.mountFlags, mode] : ['block', mode],
  );
  return { access, mode, key };
}
