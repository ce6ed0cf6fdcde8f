/** Builds CSI Volume and Snapshot messages from what the engine knows of them. */
import { create } from '@bufbuild/protobuf';
import { timestampFromMs } from '@bufbuild/protobuf/wkt';
import type { SnapshotInfo, VolumeInfo } from '../../storage-engine/index.js';
import type { ExtentStyle } from '../../storage-engine/index.js';
import type { DriverConfig } from '../config.js';
import {
  type Snapshot,
  SnapshotSchema,
  type Volume,
  type VolumeCondition,
  VolumeConditionSchema,
  type VolumeContentSource,
  VolumeContentSourceSchema,
  VolumeSchema,
} from '../gen/csi/v1/csi_pb.js';
import { profileContext } from './metadata-profiles.js';
import { nodeTopology } from './topology.js';
import { PARAM_BLOCK_SIZE, PARAM_METADATA_STYLE, storedMetadataStyle } from './volume-parameters.js';

/** The metadata style a volume was created with (volumes from before the attribute existed: the default). */
export function volumeMetadataStyle(volume: VolumeInfo, config: DriverConfig): ExtentStyle {
  return storedMetadataStyle(volume.attributes, config.defaultMetadataStyle);
}

/**
 * volume_context: the parameters the volume was made with, keyed as StorageClass parameters are. It
 * depends only on what is stored with the volume, so a volume always reports the same context.
 */
export function volumeContext(volume: VolumeInfo, config: DriverConfig): Record<string, string> {
  return {
    [PARAM_BLOCK_SIZE]: String(volume.blockSize),
    [PARAM_METADATA_STYLE]: volumeMetadataStyle(volume, config),
    ...profileContext(volume.attributes, config.defaultMetadataProfile ?? 'exact'),
  };
}

/** Where the volume's content came from, as CSI says it. */
export function contentSource(volume: VolumeInfo): VolumeContentSource | undefined {
  const source = volume.source;
  if (!source) return undefined;
  return create(VolumeContentSourceSchema, {
    type:
      source.kind === 'snapshot'
        ? { case: 'snapshot', value: { snapshotId: source.snapshotId } }
        : { case: 'volume', value: { volumeId: source.volumeId } },
  });
}

export function volumeMessage(volume: VolumeInfo, config: DriverConfig): Volume {
  return create(VolumeSchema, {
    volumeId: volume.id,
    capacityBytes: BigInt(volume.capacityBytes),
    volumeContext: volumeContext(volume, config),
    contentSource: contentSource(volume),
    accessibleTopology: [nodeTopology(config)],
  });
}

/**
 * The controller's view of a volume's health: it is in the catalog with its layers loaded, which is all
 * the controller can see (I/O errors are the node's to report).
 */
export function volumeCondition(): VolumeCondition {
  return create(VolumeConditionSchema, { abnormal: false, message: 'volume is present in the block store' });
}

/**
 * size_bytes is the snapshot's capacity: the spec defines it as the size a volume restored from it needs,
 * not the bytes it occupies.
 */
export function snapshotMessage(snapshot: SnapshotInfo): Snapshot {
  return create(SnapshotSchema, {
    snapshotId: snapshot.id,
    sourceVolumeId: snapshot.sourceVolumeId,
    sizeBytes: BigInt(snapshot.capacityBytes),
    creationTime: timestampFromMs(snapshot.createdAtMs),
    // Cutting is the whole job: the frozen layer is usable as a source the moment the call returns.
    readyToUse: true,
    // A member of a group is deleted with its group, never alone: the spec has the SP say so here.
    groupSnapshotId: snapshot.groupId ?? '',
  });
}
