/**
 * CSI Controller: volumes and snapshots as the block store holds them. A thin adapter: it checks what
 * the spec makes the plugin's job (required fields, capabilities, capacity ranges, topology, whether an
 * existing volume answers a request) and leaves every storage rule to the engine (block sizes, how large
 * a volume can be, the provisioning limit, free space, same-name snapshots), whose typed errors
 * status.ts maps to gRPC codes.
 *
 * Secrets in requests are accepted and ignored; nothing here logs a request.
 */
import { create } from '@bufbuild/protobuf';
import { Code, type ServiceImpl } from '@connectrpc/connect';
import {
  AlreadyExistsError,
  type Attributes,
  InvalidArgumentError,
  NotFoundError,
  isSnapshotId,
  isVolumeId,
  type SnapshotInfo,
  type VolumeInfo,
} from '../../storage-engine/index.js';
import {
  type Controller,
  type ControllerServiceCapability,
  ControllerServiceCapability_RPC_Type as RpcType,
  ControllerServiceCapabilitySchema,
  type CreateVolumeRequest,
} from '../gen/csi/v1/csi_pb.js';
import { rpcError } from '../rpc/status.js';
import { requireSupportedCapabilities, unsupportedCapability } from './capabilities.js';
import { type ByteRange, checkCapacityRange, fitsRange, newVolumeBytes, roundUp } from './capacity-range.js';
import { checkName, checkSnapshotParameters, snapshotAttributes } from './snapshot-requests.js';
import { snapshotMessage, volumeCondition, volumeContext, volumeMessage, volumeMetadataStyle } from './csi-objects.js';
import type { DriverContext } from './driver-context.js';
import { paginate } from './page-token.js';
import { isThisNode, satisfiesRequirement } from './topology.js';
import {
  ATTR_METADATA_STYLE,
  PARAM_BLOCK_SIZE,
  PARAM_METADATA_STYLE,
  parseVolumeParameters,
  type VolumeParameters,
} from './volume-parameters.js';
import {
  ATTR_METADATA_PROFILE,
  ATTR_OBJECT_SIZE,
  CEPH_RBD_DEFAULT_OBJECT_SIZE,
  PARAM_METADATA_PROFILE,
  PARAM_OBJECT_SIZE,
  type MetadataProfileName,
  profileAttributes,
  profileMismatch,
} from './metadata-profiles.js';
import { ioLimitAttributes } from './io-limit-parameters.js';
import { checkMutableKeys, isMutableParameter, modifiedAttributes } from './mutable-parameters.js';
import { ATTR_MAX_BANDWIDTH, ATTR_MAX_IOPS } from '../dataplane/io-limiter.js';

/** What ControllerGetCapabilities advertises; each one is implemented below. */
export const CONTROLLER_CAPABILITIES: readonly RpcType[] = [
  RpcType.CREATE_DELETE_VOLUME,
  RpcType.CREATE_DELETE_SNAPSHOT,
  RpcType.LIST_VOLUMES,
  RpcType.LIST_SNAPSHOTS,
  RpcType.GET_CAPACITY,
  RpcType.CLONE_VOLUME,
  RpcType.EXPAND_VOLUME,
  RpcType.GET_VOLUME,
  RpcType.VOLUME_CONDITION,
  RpcType.SINGLE_NODE_MULTI_WRITER,
  RpcType.MODIFY_VOLUME,
  // GET_SNAPSHOT (CSI 1.12, alpha) is served but not advertised: csi-sanity v5.4.0, the suite this driver
  // is judged by, rejects any capability it does not know, and no sidecar needs the advertisement yet.
];

/** What a CreateVolume request asks for, once validated. */
interface VolumeWish {
  name: string;
  range: ByteRange;
  params: VolumeParameters;
  /** The attributes a new volume is stored with (style, profile, I/O limits). */
  attributes: Attributes;
  /** Whether the request named a blockSize (else it is the default, and any block size matches). */
  explicitBlockSize: boolean;
  /** The attributes the request named (parameters or mutable_parameters); an existing volume must have them. */
  explicitAttributes: Attributes;
  source: { kind: 'snapshot'; snapshotId: string } | { kind: 'volume'; volumeId: string } | undefined;
  topologyOk: boolean;
}

export function controllerService(ctx: DriverContext): ServiceImpl<typeof Controller> {
  const { store, config } = ctx;
  const defaults: VolumeParameters = { blockSize: config.defaultBlockSize, metadataStyle: config.defaultMetadataStyle };
  const defaultProfile = config.defaultMetadataProfile ?? 'exact';

  /** A volume's value of an attribute, with what a volume stored without it means. */
  const attributeOf = (volume: VolumeInfo, key: string): string => {
    if (key === ATTR_METADATA_STYLE) return volumeMetadataStyle(volume, config);
    const stored = volume.attributes[key];
    if (stored !== undefined) return stored;
    if (key === ATTR_METADATA_PROFILE) return defaultProfile;
    if (key === ATTR_OBJECT_SIZE) return String(CEPH_RBD_DEFAULT_OBJECT_SIZE);
    if (key === ATTR_MAX_IOPS || key === ATTR_MAX_BANDWIDTH) return '0';
    return '';
  };

  /** The first attribute whose value differs from the volume's, as "its KEY is VALUE". */
  const attributeMismatch = (volume: VolumeInfo, wanted: Attributes): string | undefined => {
    for (const [key, value] of Object.entries(wanted)) {
      const actual = attributeOf(volume, key);
      if (actual !== value) return `its ${key} is ${actual}`;
    }
    return undefined;
  };

  /**
   * Why an existing volume does not answer the request, or undefined if it does. This is CSI's rule, not a
   * second copy of the engine's: the engine repeats a create whose arguments are identical, but a CSI
   * request is a capacity range with optional parameters and topology, which only this adapter sees
   * (a retry with a wider range, or without a blockSize, must get the volume it made the first time).
   */
  const incompatibility = (volume: VolumeInfo, wish: VolumeWish): string | undefined => {
    if (sourceKey(volume.source) !== sourceKey(wish.source)) return 'it has a different volume_content_source';
    if (!fitsRange(volume.capacityBytes, wish.range))
      return `its ${volume.capacityBytes} bytes are outside capacity_range`;
    if (wish.explicitBlockSize && volume.blockSize !== wish.params.blockSize) {
      return `its ${PARAM_BLOCK_SIZE} is ${volume.blockSize}`;
    }
    const mismatch = attributeMismatch(volume, wish.explicitAttributes);
    if (mismatch) return mismatch;
    if (!wish.topologyOk) return 'it is on this node, which accessibility_requirements.requisite excludes';
    return undefined;
  };

  /** The same-name volume if it answers the request; ALREADY_EXISTS if it does not. */
  const existingVolume = (wish: VolumeWish): VolumeInfo | undefined => {
    const existing = store.findVolumeByName(wish.name);
    if (!existing) return undefined;
    const why = incompatibility(existing, wish);
    if (why) throw rpcError(Code.AlreadyExists, `volume ${JSON.stringify(wish.name)} exists but ${why}`);
    return existing;
  };

  const createVolumeResponse = (volume: VolumeInfo) => ({ volume: volumeMessage(volume, config) });

  return {
    controllerGetCapabilities() {
      const capabilities: ControllerServiceCapability[] = CONTROLLER_CAPABILITIES.map((type) =>
        create(ControllerServiceCapabilitySchema, { type: { case: 'rpc', value: { type } } }),
      );
      return { capabilities };
    },

    async createVolume(req) {
      const wish = volumeWish(req, defaults, defaultProfile, ctx);
      const existing = existingVolume(wish);
      if (existing) return createVolumeResponse(existing);
      if (!wish.topologyOk) {
        throw rpcError(
          Code.ResourceExhausted,
          `volumes can only be provisioned on node ${config.nodeId}, which accessibility_requirements.requisite does not include`,
        );
      }
      // The source's size and block size decide the new volume's; a blockSize parameter that differs from
      // the source's is passed on for the engine to refuse.
      const src = !wish.source
        ? undefined
        : wish.source.kind === 'snapshot'
          ? store.getSnapshot(wish.source.snapshotId)
          : store.getVolume(wish.source.volumeId);
      const capacityBytes = newVolumeBytes(wish.range, src?.blockSize ?? wish.params.blockSize, src?.capacityBytes);
      let volume: VolumeInfo;
      try {
        volume = await store.createVolume({
          name: wish.name,
          capacityBytes,
          ...(src === undefined || wish.explicitBlockSize ? { blockSize: wish.params.blockSize } : {}),
          ...(wish.source?.kind === 'snapshot' ? { sourceSnapshotId: wish.source.snapshotId } : {}),
          ...(wish.source?.kind === 'volume' ? { sourceVolumeId: wish.source.volumeId } : {}),
          attributes: wish.attributes,
        });
      } catch (err) {
        // A concurrent call of the same name won; it may still answer this request (e.g. a wider range).
        const winner = err instanceof AlreadyExistsError ? existingVolume(wish) : undefined;
        if (!winner) throw err;
        volume = winner;
      }
      ctx.logger.info({ volumeId: volume.id, name: wish.name, capacityBytes: volume.capacityBytes }, 'volume ready');
      return createVolumeResponse(volume);
    },

    async deleteVolume(req) {
      if (!req.volumeId) throw rpcError(Code.InvalidArgument, 'volume_id is required');
      try {
        await store.deleteVolume(req.volumeId);
        ctx.logger.info({ volumeId: req.volumeId }, 'volume deleted');
      } catch (err) {
        // Already gone (or never ours): deletion is idempotent.
        if (!(err instanceof NotFoundError)) throw err;
      }
      return {};
    },

    validateVolumeCapabilities(req) {
      if (!req.volumeId) throw rpcError(Code.InvalidArgument, 'volume_id is required');
      if (req.volumeCapabilities.length === 0) throw rpcError(Code.InvalidArgument, 'volume_capabilities is required');
      const volume = store.getVolume(req.volumeId);
      const reason =
        unsupportedCapability(req.volumeCapabilities) ??
        contextMismatch(req.volumeContext, volumeContext(volume, config)) ??
        parametersMismatch(req.parameters, volume, defaults, ctx) ??
        mutableMismatch(req.mutableParameters, volume);
      if (reason) return { message: reason };
      return {
        confirmed: {
          volumeContext: req.volumeContext,
          volumeCapabilities: req.volumeCapabilities,
          parameters: req.parameters,
          mutableParameters: req.mutableParameters,
        },
      };
    },

    listVolumes(req) {
      const page = paginate(store.listVolumes(), req, isVolumeId);
      return {
        entries: page.entries.map((volume) => ({
          volume: volumeMessage(volume, config),
          status: { volumeCondition: volumeCondition() },
        })),
        nextToken: page.nextToken,
      };
    },

    getCapacity(req) {
      const unsupported = unsupportedCapability(req.volumeCapabilities);
      const params = parseVolumeParameters(req.parameters, defaults);
      const topology = req.accessibleTopology;
      const elsewhere =
        topology !== undefined && Object.keys(topology.segments).length > 0 && !isThisNode(topology, config);
      // Valid requests this driver cannot provision for have no capacity, rather than an error.
      if (unsupported !== undefined || elsewhere) return { availableCapacity: 0n };
      // The engine knows the provisioning limit, the free space and the largest volume its filesystem holds.
      const capacity = store.capacity(params.blockSize);
      return {
        availableCapacity: BigInt(capacity.availableBytes),
        maximumVolumeSize: BigInt(capacity.maximumVolumeBytes),
        minimumVolumeSize: BigInt(params.blockSize),
      };
    },

    controllerGetVolume(req) {
      if (!req.volumeId) throw rpcError(Code.InvalidArgument, 'volume_id is required');
      const volume = store.getVolume(req.volumeId);
      return { volume: volumeMessage(volume, config), status: { volumeCondition: volumeCondition() } };
    },

    async createSnapshot(req) {
      if (!req.sourceVolumeId) throw rpcError(Code.InvalidArgument, 'source_volume_id is required');
      checkName(req.name, 'name');
      checkSnapshotParameters(req.parameters);
      // Same-name snapshots are the engine's to answer, even when the source volume was deleted after the cut
      // (then there is no volume to read a style from, and the engine returns the snapshot it has).
      const volume = findVolume(req.sourceVolumeId);
      const snapshot = await store.createSnapshot({
        volumeId: req.sourceVolumeId,
        name: req.name,
        // The SnapshotMetadata service answers in the style of the volume the snapshot was taken of.
        attributes: snapshotAttributes(volume, config),
      });
      ctx.logger.info({ snapshotId: snapshot.id, name: req.name, volumeId: snapshot.sourceVolumeId }, 'snapshot ready');
      return { snapshot: snapshotMessage(snapshot) };
    },

    async deleteSnapshot(req) {
      if (!req.snapshotId) throw rpcError(Code.InvalidArgument, 'snapshot_id is required');
      try {
        await store.deleteSnapshot(req.snapshotId);
        ctx.logger.info({ snapshotId: req.snapshotId }, 'snapshot deleted');
      } catch (err) {
        if (!(err instanceof NotFoundError)) throw err;
      }
      return {};
    },

    listSnapshots(req) {
      let snapshots: SnapshotInfo[];
      if (req.snapshotId) {
        // A filter that matches nothing is an empty list, not an error.
        const one = findSnapshot(req.snapshotId);
        snapshots = one && (!req.sourceVolumeId || one.sourceVolumeId === req.sourceVolumeId) ? [one] : [];
      } else {
        snapshots = store.listSnapshots(req.sourceVolumeId ? { sourceVolumeId: req.sourceVolumeId } : {});
      }
      const page = paginate(snapshots, req, isSnapshotId);
      return { entries: page.entries.map((s) => ({ snapshot: snapshotMessage(s) })), nextToken: page.nextToken };
    },

    getSnapshot(req) {
      if (!req.snapshotId) throw rpcError(Code.InvalidArgument, 'snapshot_id is required');
      return { snapshot: snapshotMessage(store.getSnapshot(req.snapshotId)) };
    },

    async controllerExpandVolume(req) {
      if (!req.volumeId) throw rpcError(Code.InvalidArgument, 'volume_id is required');
      if (!req.capacityRange) throw rpcError(Code.InvalidArgument, 'capacity_range is required');
      const range = checkCapacityRange(req.capacityRange);
      if (range.requiredBytes === 0 && range.limitBytes === 0) {
        throw rpcError(Code.InvalidArgument, 'capacity_range needs required_bytes or limit_bytes');
      }
      if (req.volumeCapability) requireSupportedCapabilities([req.volumeCapability], 'volume_capability');
      // The node always has work: the loop devices (block and filesystem volumes alike) keep their old size
      // until NodeExpandVolume refreshes them, and kubelets skip that call when this says false.
      const nodeExpansionRequired = true;
      const volume = store.getVolume(req.volumeId);
      const done = (v: VolumeInfo) => ({ capacityBytes: BigInt(v.capacityBytes), nodeExpansionRequired });
      // Already as large as asked (a retry, or a request to shrink): nothing to do.
      if (volume.capacityBytes >= range.requiredBytes) return done(volume);
      const target = roundUp(range.requiredBytes, volume.blockSize);
      if (range.limitBytes !== 0 && target > range.limitBytes) {
        throw rpcError(
          Code.OutOfRange,
          `no size satisfies capacity_range [${range.requiredBytes}, ${range.limitBytes}]: volumes are whole ${volume.blockSize}-byte blocks`,
        );
      }
      try {
        return done(await store.growVolume(volume.id, target));
      } catch (err) {
        // A concurrent expansion went further: the volume is already large enough.
        if (!(err instanceof InvalidArgumentError)) throw err;
        const now = store.getVolume(volume.id);
        if (now.capacityBytes < range.requiredBytes) throw err;
        return done(now);
      }
    },

    controllerPublishVolume() {
      throw unimplemented('ControllerPublishVolume', 'volumes need no controller-side attach');
    },
    controllerUnpublishVolume() {
      throw unimplemented('ControllerUnpublishVolume', 'volumes need no controller-side attach');
    },
    async controllerModifyVolume(req) {
      if (!req.volumeId) throw rpcError(Code.InvalidArgument, 'volume_id is required');
      const volume = store.getVolume(req.volumeId);
      // Every key and value is checked before anything is stored: a refused request changes nothing.
      const changes = modifiedAttributes(req.mutableParameters, volume.attributes, defaultProfile);
      // Setting what the volume already has is a no-op (an idempotent repeat).
      await store.updateVolumeAttributes(volume.id, changes);
      ctx.logger.info({ volumeId: volume.id, changes }, 'volume modified');
      return {};
    },
  };

  /** Why mutable_parameters given to ValidateVolumeCapabilities do not describe the volume, if they do not. */
  function mutableMismatch(mutable: Readonly<Record<string, string>>, volume: VolumeInfo): string | undefined {
    if (Object.keys(mutable).length === 0) return undefined;
    let wanted: Attributes;
    try {
      wanted = modifiedAttributes(mutable, volume.attributes, defaultProfile);
    } catch (err) {
      if (err instanceof InvalidArgumentError) return err.message;
      throw err;
    }
    const why = attributeMismatch(volume, wanted);
    return why && `mutable_parameters do not describe the volume: ${why}`;
  }

  function findVolume(id: string): VolumeInfo | undefined {
    try {
      return store.getVolume(id);
    } catch (err) {
      if (err instanceof NotFoundError) return undefined;
      throw err;
    }
  }

  function findSnapshot(id: string): SnapshotInfo | undefined {
    try {
      return store.getSnapshot(id);
    } catch (err) {
      if (err instanceof NotFoundError) return undefined;
      throw err;
    }
  }
}

/** Validates a CreateVolume request into what it asks for; INVALID_ARGUMENT for anything malformed. */
function volumeWish(
  req: CreateVolumeRequest,
  defaults: VolumeParameters,
  defaultProfile: MetadataProfileName,
  ctx: DriverContext,
): VolumeWish {
  checkName(req.name, 'name');
  requireSupportedCapabilities(req.volumeCapabilities);
  checkMutableKeys(req.mutableParameters);
  const range = checkCapacityRange(req.capacityRange);
  // mutable_parameters take precedence over parameters (spec: CreateVolume).
  const given: Record<string, string> = { ...req.parameters, ...req.mutableParameters };
  const params = parseVolumeParameters(given, defaults);
  const profile = profileAttributes(given, defaultProfile);
  const limits = ioLimitAttributes(given);
  let source: VolumeWish['source'];
  const content = req.volumeContentSource;
  if (content) {
    switch (content.type.case) {
      case 'snapshot':
        if (!content.type.value.snapshotId) {
          throw rpcError(Code.InvalidArgument, 'volume_content_source.snapshot.snapshot_id is required');
        }
        source = { kind: 'snapshot', snapshotId: content.type.value.snapshotId };
        break;
      case 'volume':
        if (!content.type.value.volumeId) {
          throw rpcError(Code.InvalidArgument, 'volume_content_source.volume.volume_id is required');
        }
        source = { kind: 'volume', volumeId: content.type.value.volumeId };
        break;
      default:
        throw rpcError(Code.InvalidArgument, 'volume_content_source needs a snapshot or a volume');
    }
  }
  return {
    name: req.name,
    range,
    params,
    attributes: { [ATTR_METADATA_STYLE]: params.metadataStyle, ...profile, ...limits },
    explicitBlockSize: Object.hasOwn(given, PARAM_BLOCK_SIZE),
    explicitAttributes: {
      ...(Object.hasOwn(given, PARAM_METADATA_STYLE) ? { [ATTR_METADATA_STYLE]: params.metadataStyle } : {}),
      ...(Object.hasOwn(given, PARAM_METADATA_PROFILE)
        ? { [ATTR_METADATA_PROFILE]: profile[ATTR_METADATA_PROFILE]! }
        : {}),
      ...(Object.hasOwn(given, PARAM_OBJECT_SIZE) ? { [ATTR_OBJECT_SIZE]: profile[ATTR_OBJECT_SIZE]! } : {}),
      ...limits,
    },
    source,
    topologyOk: satisfiesRequirement(req.accessibilityRequirements, ctx.config),
  };
}

function sourceKey(source: VolumeInfo['source']): string {
  if (!source) return '';
  return source.kind === 'snapshot' ? `snapshot:${source.snapshotId}` : `volume:${source.volumeId}`;
}

/**
 * A volume_context given to ValidateVolumeCapabilities must be the volume's own. It was made at creation,
 * so the value of a mutable parameter (metadataStyle) may have changed since; its key must still be there.
 */
function contextMismatch(
  given: Readonly<Record<string, string>>,
  actual: Readonly<Record<string, string>>,
): string | undefined {
  const keys = Object.keys(given);
  if (keys.length === 0) return undefined;
  const same =
    keys.length === Object.keys(actual).length &&
    keys.every((k) => actual[k] === given[k] || (isMutableParameter(k) && Object.hasOwn(actual, k)));
  return same ? undefined : 'volume_context does not match the volume';
}

/** Parameters given to ValidateVolumeCapabilities must be valid and describe the volume. */
function parametersMismatch(
  parameters: Readonly<Record<string, string>>,
  volume: VolumeInfo,
  defaults: VolumeParameters,
  ctx: DriverContext,
): string | undefined {
  if (Object.keys(parameters).length === 0) return undefined;
  let params: VolumeParameters;
  try {
    params = parseVolumeParameters(parameters, defaults);
  } catch (err) {
    if (err instanceof InvalidArgumentError) return err.message;
    throw err;
  }
  if (Object.hasOwn(parameters, PARAM_BLOCK_SIZE) && params.blockSize !== volume.blockSize) {
    return `the volume's ${PARAM_BLOCK_SIZE} is ${volume.blockSize}, not ${params.blockSize}`;
  }
  const style = volumeMetadataStyle(volume, ctx.config);
  if (Object.hasOwn(parameters, PARAM_METADATA_STYLE) && params.metadataStyle !== style) {
    return `the volume's ${PARAM_METADATA_STYLE} is ${style}, not ${params.metadataStyle}`;
  }
  try {
    const profile = profileMismatch(parameters, volume.attributes, ctx.config.defaultMetadataProfile ?? 'exact');
    if (profile) return `the volume's ${profile.parameter} is ${profile.actual}, not ${profile.wanted}`;
  } catch (err) {
    if (err instanceof InvalidArgumentError) return err.message;
    throw err;
  }
  return undefined;
}

function unimplemented(method: string, why: string) {
  return rpcError(Code.Unimplemented, `${method} is not implemented: ${why}`);
}
