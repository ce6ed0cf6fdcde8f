/**
 * Behaviour profiles of the SnapshotMetadata service: answer the way a production driver does, so a
 * backup vendor can test against that shape here. Each profile only coarsens, splits or re-batches the
 * engine's exact extents, so every answer stays spec-correct (ordered, non-overlapping, covering every
 * change). The facts behind each profile, with their sources, are in docs/for-backup-vendors.md.
 */
import { InvalidArgumentError, type Attributes, type Extent } from '../../storage-engine/index.js';
import type { ExtentStyle } from '../../storage-engine/index.js';

export type MetadataProfileName = 'exact' | 'hostpath' | 'ceph-rbd';
export const METADATA_PROFILES: readonly MetadataProfileName[] = ['exact', 'hostpath', 'ceph-rbd'];

/** StorageClass parameter keys. */
export const PARAM_METADATA_PROFILE = 'metadataProfile';
export const PARAM_OBJECT_SIZE = 'objectSize';
/** Attribute keys stored with volumes and snapshots (as ATTR_METADATA_STYLE is). */
export const ATTR_METADATA_PROFILE = 'metadataProfile';
export const ATTR_OBJECT_SIZE = 'objectSize';

/** csi-driver-host-path: one FIXED_LENGTH tuple per 4 KiB block (pkg/state/state.go BlockSizeBytes). */
export const HOSTPATH_BLOCK_BYTES = 4096;
/** csi-driver-host-path's defaultMaxResults (pkg/hostpath/snapshotmetadataserver.go). */
export const HOSTPATH_MAX_TUPLES = 256;
/** ceph-csi's defaultMaxResults, also its cap (internal/rbd/sms_controllerserver.go). */
export const CEPH_RBD_MAX_TUPLES = 128;
/** RBD's default object size (order 22). */
export const CEPH_RBD_DEFAULT_OBJECT_SIZE = 4 * 1024 * 1024;
/** RBD object sizes are powers of two from order 12 to order 25. */
const MIN_OBJECT_SIZE = 4096;
const MAX_OBJECT_SIZE = 32 * 1024 * 1024;

/** A profile as it applies to one snapshot. */
export interface MetadataProfile {
  name: MetadataProfileName;
  /** ceph-rbd only: bytes of one RADOS object; any change inside it reports all of it. */
  objectSize: number;
}

export function parseMetadataProfile(value: string): MetadataProfileName {
  const v = value.trim().toLowerCase();
  if (!(METADATA_PROFILES as readonly string[]).includes(v)) {
    throw new InvalidArgumentError(
      `${PARAM_METADATA_PROFILE} ${JSON.stringify(value.slice(0, 64))} must be one of ${METADATA_PROFILES.join(', ')}`,
    );
  }
  return v as MetadataProfileName;
}

/** "4194304", "4Mi", "64Ki": a power of two from 4 KiB to 32 MiB, as RBD allows. */
export function parseObjectSize(value: string): number {
  const m = /^(\d+)(|Ki|KiB|Mi|MiB)$/.exec(value.trim());
  const bytes = m ? Number(m[1]) * (m[2]!.startsWith('Ki') ? 1024 : m[2]!.startsWith('Mi') ? 1024 * 1024 : 1) : NaN;
  if (
    !Number.isSafeInteger(bytes) ||
    bytes < MIN_OBJECT_SIZE ||
    bytes > MAX_OBJECT_SIZE ||
    (bytes & (bytes - 1)) !== 0
  ) {
    throw new InvalidArgumentError(
      `${PARAM_OBJECT_SIZE} ${JSON.stringify(value.slice(0, 64))} must be a power of two from 4096 (4Ki) to 33554432 (32Mi) bytes`,
    );
  }
  return bytes;
}

/**
 * The profile attributes a new volume is stored with: the StorageClass's, or the driver's default.
 * Throws InvalidArgumentError for a bad value, or objectSize without the ceph-rbd profile.
 */
export function profileAttributes(
  parameters: Readonly<Record<string, string>>,
  defaultProfile: MetadataProfileName,
): Attributes {
  const name =
    parameters[PARAM_METADATA_PROFILE] !== undefined
      ? parseMetadataProfile(parameters[PARAM_METADATA_PROFILE])
      : defaultProfile;
  const objectSizeParam = parameters[PARAM_OBJECT_SIZE];
  if (objectSizeParam !== undefined && name !== 'ceph-rbd') {
    throw new InvalidArgumentError(
      `${PARAM_OBJECT_SIZE} applies only to ${PARAM_METADATA_PROFILE} ceph-rbd, not ${name}`,
    );
  }
  const objectSize = objectSizeParam !== undefined ? parseObjectSize(objectSizeParam) : CEPH_RBD_DEFAULT_OBJECT_SIZE;
  return name === 'ceph-rbd'
    ? { [ATTR_METADATA_PROFILE]: name, [ATTR_OBJECT_SIZE]: String(objectSize) }
    : { [ATTR_METADATA_PROFILE]: name };
}

/** The profile attributes of a volume, copied to each snapshot taken of it. */
export function inheritedProfileAttributes(volumeAttributes: Attributes): Attributes {
  const out: Record<string, string> = {};
  for (const key of [ATTR_METADATA_PROFILE, ATTR_OBJECT_SIZE]) {
    if (volumeAttributes[key] !== undefined) out[key] = volumeAttributes[key];
  }
  return out;
}

/** The profile a snapshot answers with; snapshots stored without one use the driver's default. */
export function profileOf(attributes: Attributes, defaultProfile: MetadataProfileName): MetadataProfile {
  const stored = attributes[ATTR_METADATA_PROFILE];
  const name = stored ? parseMetadataProfile(stored) : defaultProfile;
  const objectSize = attributes[ATTR_OBJECT_SIZE]
    ? parseObjectSize(attributes[ATTR_OBJECT_SIZE])
    : CEPH_RBD_DEFAULT_OBJECT_SIZE;
  return { name, objectSize };
}

/**
 * volume_context entries of a volume's profile, keyed as the StorageClass parameters are: metadataProfile,
 * and objectSize for ceph-rbd. Volumes stored without a profile report the driver's default.
 */
export function profileContext(volumeAttributes: Attributes, defaultProfile: MetadataProfileName): Attributes {
  const profile = profileOf(volumeAttributes, defaultProfile);
  return profile.name === 'ceph-rbd'
    ? { [PARAM_METADATA_PROFILE]: profile.name, [PARAM_OBJECT_SIZE]: String(profile.objectSize) }
    : { [PARAM_METADATA_PROFILE]: profile.name };
}

/** A profile parameter whose value differs from the volume's. */
export interface ProfileMismatch {
  parameter: typeof PARAM_METADATA_PROFILE | typeof PARAM_OBJECT_SIZE;
  /** The volume's value. */
  actual: string;
  /** The parameters' value. */
  wanted: string;
}

/**
 * Whether `parameters` name a metadataProfile or objectSize the volume does not have (only what the
 * parameters name counts, as for blockSize). Throws InvalidArgumentError for a bad value.
 */
export function profileMismatch(
  parameters: Readonly<Record<string, string>>,
  volumeAttributes: Attributes,
  defaultProfile: MetadataProfileName,
): ProfileMismatch | undefined {
  const namesProfile = Object.hasOwn(parameters, PARAM_METADATA_PROFILE);
  const namesObjectSize = Object.hasOwn(parameters, PARAM_OBJECT_SIZE);
  if (!namesProfile && !namesObjectSize) return undefined;
  const wanted = profileOf(profileAttributes(parameters, defaultProfile), defaultProfile);
  const actual = profileOf(volumeAttributes, defaultProfile);
  if (wanted.name !== actual.name)
    return { parameter: PARAM_METADATA_PROFILE, actual: actual.name, wanted: wanted.name };
  if (namesObjectSize && wanted.objectSize !== actual.objectSize) {
    return { parameter: PARAM_OBJECT_SIZE, actual: String(actual.objectSize), wanted: String(wanted.objectSize) };
  }
  return undefined;
}

/** The style a snapshot's responses declare under its profile. */
export function profileStyle(profile: MetadataProfile, volumeStyle: ExtentStyle): ExtentStyle {
  if (profile.name === 'hostpath') return 'FIXED';
  if (profile.name === 'ceph-rbd') return 'VARIABLE';
  return volumeStyle;
}

/** Tuples per message: max_results (0: the profile's or driver's default), capped by the profile. */
export function profileBatchSize(
  profile: MetadataProfile,
  maxResults: number,
  driverDefault: number,
  driverCap: number,
): number {
  const cap =
    profile.name === 'hostpath' ? HOSTPATH_MAX_TUPLES : profile.name === 'ceph-rbd' ? CEPH_RBD_MAX_TUPLES : driverCap;
  const wanted = maxResults === 0 ? (profile.name === 'exact' ? driverDefault : cap) : maxResults;
  return Math.min(wanted, cap);
}

/** Whether a profile sends one empty message when there is nothing to report (ceph-csi sends none). */
export function sendsEmptyMessage(profile: MetadataProfile): boolean {
  return profile.name !== 'ceph-rbd';
}

/** What the real driver answers for a base snapshot that no longer exists (code NOT_FOUND in both). */
export function missingBaseMessage(
  profile: MetadataProfile,
  baseSnapshotId: string,
  cause: string,
): string | undefined {
  if (profile.name === 'hostpath') return 'cannot find the source snapshot';
  if (profile.name === 'ceph-rbd')
    return `snapshot ${JSON.stringify(baseSnapshotId.slice(0, 128))} not found: ${cause}`;
  return undefined;
}

/**
 * Reshapes the engine's exact extents (merged runs, in order) into the profile's tuples, batched at most
 * `batchSize` a message. `exact` passes them through unchanged.
 */
export async function* shapeExtents(
  profile: MetadataProfile,
  exact: AsyncIterable<Extent[]>,
  params: { batchSize: number; capacityBytes: number },
): AsyncGenerator<Extent[]> {
  if (profile.name === 'exact') {
    yield* exact;
    return;
  }
  const { batchSize, capacityBytes } = params;
  let batch: Extent[] = [];
  /** End of the last tuple emitted: ceph-rbd objects touched by two runs are reported once. */
  let emittedEnd = 0;
  for await (const extents of exact) {
    for (const extent of extents) {
      if (profile.name === 'hostpath') {
        // Engine blocks are 4 KiB or larger powers of two, so every run splits into whole 4 KiB tuples.
        for (let at = extent.offset; at < extent.offset + extent.length; at += HOSTPATH_BLOCK_BYTES) {
          batch.push({ offset: at, length: HOSTPATH_BLOCK_BYTES });
          if (batch.length === batchSize) {
            yield batch;
            batch = [];
          }
        }
        continue;
      }
      // ceph-rbd: one tuple per object the run touches (librbd calls back per object; ceph-csi never merges).
      const size = profile.objectSize;
      let object = Math.floor(extent.offset / size) * size;
      if (object < emittedEnd) object += size; // already reported by the previous run
      for (; object < extent.offset + extent.length; object += size) {
        const end = Math.min(object + size, capacityBytes);
        batch.push({ offset: object, length: end - object });
        emittedEnd = end;
        if (batch.length === batchSize) {
          yield batch;
          batch = [];
        }
      }
    }
  }
  if (batch.length > 0) yield batch;
}
