/**
 * StorageClass parameters this driver understands, validated strictly: a typo in a StorageClass should
 * fail provisioning loudly, not silently give a default.
 */
import {
  EngineError,
  InvalidArgumentError,
  MAX_BLOCK_SIZE,
  MIN_BLOCK_SIZE,
  checkBlockSize,
  type ExtentStyle,
} from '../../storage-engine/index.js';
import {
  PARAM_METADATA_PROFILE,
  PARAM_OBJECT_SIZE,
  parseMetadataProfile,
  parseObjectSize,
} from './metadata-profiles.js';
import { PARAM_MAX_BANDWIDTH, PARAM_MAX_IOPS, parseMaxBandwidth, parseMaxIops } from './io-limit-parameters.js';

/** Parameter keys (StorageClass `parameters`). */
export const PARAM_BLOCK_SIZE = 'blockSize';
export const PARAM_METADATA_STYLE = 'metadataStyle';

/** Keys the external-provisioner and snapshotter add themselves (--extra-create-metadata); accepted and ignored. */
export const SIDECAR_PREFIX = 'csi.storage.k8s.io/';

/** Attribute keys stored with volumes and snapshots in the engine. */
export const ATTR_METADATA_STYLE = 'metadataStyle';

export interface VolumeParameters {
  blockSize: number;
  metadataStyle: ExtentStyle;
}

/** Parses "4096", "4Ki", "64KiB", "1Mi" into bytes; which sizes are allowed is the engine's rule (checkBlockSize). */
export function parseBlockSize(value: string): number {
  const m = /^(\d+)(|Ki|KiB|Mi|MiB)$/.exec(value.trim());
  if (!m)
    throw new InvalidArgumentError(
      `${PARAM_BLOCK_SIZE} ${JSON.stringify(value)} is not a size such as 4096, 64Ki or 1Mi`,
    );
  const unit = m[2]!.startsWith('Ki') ? 1024 : m[2]!.startsWith('Mi') ? 1024 * 1024 : 1;
  try {
    return checkBlockSize(Number(m[1]) * unit);
  } catch (err) {
    if (!(err instanceof EngineError)) throw err;
    // Restated with the parameter's name and units, as a StorageClass author wrote it.
    throw new InvalidArgumentError(
      `${PARAM_BLOCK_SIZE} ${JSON.stringify(value)} must be a power of two from ${MIN_BLOCK_SIZE} (${MIN_BLOCK_SIZE / 1024}Ki) to ${MAX_BLOCK_SIZE} (${MAX_BLOCK_SIZE / 1024 / 1024}Mi) bytes`,
    );
  }
}

/** The metadata style stored with a volume or snapshot; objects from before the attribute existed get the default. */
export function storedMetadataStyle(
  attributes: Readonly<Record<string, string>>,
  defaultStyle: ExtentStyle,
): ExtentStyle {
  const stored = attributes[ATTR_METADATA_STYLE];
  return stored ? parseMetadataStyle(stored) : defaultStyle;
}

export function parseMetadataStyle(value: string): ExtentStyle {
  const v = value
    .trim()
    .toUpperCase()
    .replace(/_LENGTH$/, '');
  if (v !== 'FIXED' && v !== 'VARIABLE') {
    throw new InvalidArgumentError(
      `${PARAM_METADATA_STYLE} ${JSON.stringify(value)} must be FIXED_LENGTH or VARIABLE_LENGTH (or FIXED / VARIABLE)`,
    );
  }
  return v;
}

/** Validates CreateVolume parameters; unknown keys are rejected with INVALID_ARGUMENT. */
export function parseVolumeParameters(
  parameters: Readonly<Record<string, string>>,
  defaults: VolumeParameters,
): VolumeParameters {
  const result = { ...defaults };
  for (const [key, value] of Object.entries(parameters)) {
    if (key === PARAM_BLOCK_SIZE) result.blockSize = parseBlockSize(value);
    else if (key === PARAM_METADATA_STYLE) result.metadataStyle = parseMetadataStyle(value);
    // Validated here, stored by profileAttributes() (metadata-profiles.ts).
    else if (key === PARAM_METADATA_PROFILE) parseMetadataProfile(value);
    else if (key === PARAM_OBJECT_SIZE) parseObjectSize(value);
    // Validated here, stored by ioLimitAttributes() (io-limit-parameters.ts).
    else if (key === PARAM_MAX_IOPS) parseMaxIops(value);
    else if (key === PARAM_MAX_BANDWIDTH) parseMaxBandwidth(value);
    else if (!key.startsWith(SIDECAR_PREFIX)) {
      throw new InvalidArgumentError(
        `unknown parameter ${JSON.stringify(key.slice(0, 128))}; this driver accepts ${PARAM_BLOCK_SIZE}, ${PARAM_METADATA_STYLE}, ${PARAM_METADATA_PROFILE}, ${PARAM_OBJECT_SIZE}, ${PARAM_MAX_IOPS} and ${PARAM_MAX_BANDWIDTH}`,
      );
    }
  }
  return result;
}
