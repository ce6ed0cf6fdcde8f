/**
 * Mutable parameters (CSI MODIFY_VOLUME; Kubernetes VolumeAttributesClass): the volume settings that may
 * change after creation, as CreateVolume `mutable_parameters` and ControllerModifyVolume take them.
 *
 * - metadataStyle, metadataProfile, objectSize: how the SnapshotMetadata service answers for snapshots
 *   taken from then on (a snapshot keeps the style and profile of the moment it was taken);
 * - maxIops, maxBandwidth: I/O limits the node data plane enforces (src/dataplane/io-limiter.ts).
 *
 * Each becomes a volume attribute in the block store. blockSize is a parameter too but cannot change.
 * Validation is all-or-nothing: a request with one bad key changes nothing.
 */
import { InvalidArgumentError, type Attributes } from '../../storage-engine/index.js';
import { PARAM_MAX_BANDWIDTH, PARAM_MAX_IOPS, ioLimitAttributes } from './io-limit-parameters.js';
import {
  ATTR_METADATA_PROFILE,
  ATTR_OBJECT_SIZE,
  CEPH_RBD_DEFAULT_OBJECT_SIZE,
  PARAM_METADATA_PROFILE,
  PARAM_OBJECT_SIZE,
  parseMetadataProfile,
  parseObjectSize,
} from './metadata-profiles.js';
import {
  ATTR_METADATA_STYLE,
  PARAM_BLOCK_SIZE,
  PARAM_METADATA_STYLE,
  parseMetadataStyle,
} from './volume-parameters.js';

/** Keys accepted in mutable_parameters, in the order messages list them. */
export const MUTABLE_PARAMETERS: readonly string[] = [
  PARAM_METADATA_STYLE,
  PARAM_METADATA_PROFILE,
  PARAM_OBJECT_SIZE,
  PARAM_MAX_IOPS,
  PARAM_MAX_BANDWIDTH,
];

/** Parameters fixed at creation: named in the message that refuses them. */
const IMMUTABLE_PARAMETERS: readonly string[] = [PARAM_BLOCK_SIZE];

/** Whether a key is one that mutable_parameters may hold. */
export function isMutableParameter(key: string): boolean {
  return MUTABLE_PARAMETERS.includes(key);
}

/**
 * Throws INVALID_ARGUMENT for a key mutable_parameters may not hold, naming it: blockSize (fixed at
 * creation) or a key this driver does not know.
 */
export function checkMutableKeys(mutable: Readonly<Record<string, string>>): void {
  for (const key of Object.keys(mutable)) {
    if (isMutableParameter(key)) continue;
    const shown = JSON.stringify(key.slice(0, 128));
    if (IMMUTABLE_PARAMETERS.includes(key)) {
      throw new InvalidArgumentError(
        `mutable parameter ${shown} cannot change after creation (set it in the StorageClass parameters); mutable ones are ${MUTABLE_PARAMETERS.join(', ')}`,
      );
    }
    throw new InvalidArgumentError(
      `unknown mutable parameter ${shown}; this driver accepts ${MUTABLE_PARAMETERS.join(', ')}`,
    );
  }
}

/**
 * The attribute changes ControllerModifyVolume makes to a volume with `current` attributes. Only keys
 * given change anything (the spec forbids acting on absent keys). Throws InvalidArgumentError, naming the
 * key, for an unknown or immutable key or a bad value; objectSize needs the ceph-rbd profile, either
 * given in the same request or the volume's.
 */
export function modifiedAttributes(
  mutable: Readonly<Record<string, string>>,
  current: Attributes,
  defaultProfile: string,
): Record<string, string> {
  checkMutableKeys(mutable);
  const out: Record<string, string> = {};
  const style = mutable[PARAM_METADATA_STYLE];
  if (style !== undefined) out[ATTR_METADATA_STYLE] = parseMetadataStyle(style);
  const profileParam = mutable[PARAM_METADATA_PROFILE];
  if (profileParam !== undefined) out[ATTR_METADATA_PROFILE] = parseMetadataProfile(profileParam);
  const profile = out[ATTR_METADATA_PROFILE] ?? current[ATTR_METADATA_PROFILE] ?? defaultProfile;
  const objectSize = mutable[PARAM_OBJECT_SIZE];
  if (objectSize !== undefined) {
    if (profile !== 'ceph-rbd') {
      throw new InvalidArgumentError(
        `${PARAM_OBJECT_SIZE} applies only to ${PARAM_METADATA_PROFILE} ceph-rbd; the volume's is ${profile}`,
      );
    }
    out[ATTR_OBJECT_SIZE] = String(parseObjectSize(objectSize));
  } else if (out[ATTR_METADATA_PROFILE] === 'ceph-rbd' && current[ATTR_OBJECT_SIZE] === undefined) {
    out[ATTR_OBJECT_SIZE] = String(CEPH_RBD_DEFAULT_OBJECT_SIZE);
  }
  Object.assign(out, ioLimitAttributes(mutable));
  return out;
}
