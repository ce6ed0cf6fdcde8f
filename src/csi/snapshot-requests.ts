/**
 * Checks shared by the RPCs that create snapshots (Controller.CreateSnapshot and
 * GroupController.CreateVolumeGroupSnapshot), and the attributes a snapshot keeps of its volume.
 */
import { Code } from '@connectrpc/connect';
import type { VolumeInfo } from '../../storage-engine/index.js';
import type { DriverConfig } from '../config.js';
import { rpcError } from '../rpc/status.js';
import { volumeMetadataStyle } from './csi-objects.js';
import { inheritedProfileAttributes } from './metadata-profiles.js';
import { ATTR_METADATA_STYLE, SIDECAR_PREFIX } from './volume-parameters.js';

/** Control characters the spec bans from volume and snapshot names. */
// biome-ignore lint/suspicious/noControlCharactersInRegex: matching control characters is the point
const BANNED_NAME_CHARS = /[\u0000-\u0008\u000B\u000C\u000E-\u001F\u007F-\u009F]/;

/** A name field: required, no control characters. */
export function checkName(name: string, field: string): void {
  if (!name) throw rpcError(Code.InvalidArgument, `${field} is required`);
  if (BANNED_NAME_CHARS.test(name)) throw rpcError(Code.InvalidArgument, `${field} contains control characters`);
}

/** Snapshot parameters: only the sidecars' own (csi.storage.k8s.io/…) are accepted; this driver takes none. */
export function checkSnapshotParameters(parameters: Readonly<Record<string, string>>): void {
  for (const key of Object.keys(parameters)) {
    if (!key.startsWith(SIDECAR_PREFIX)) {
      throw rpcError(Code.InvalidArgument, `unknown snapshot parameter ${JSON.stringify(key.slice(0, 128))}`);
    }
  }
}

/** What a snapshot remembers of its volume: the SnapshotMetadata service answers in its style and profile. */
export function snapshotAttributes(volume: VolumeInfo | undefined, config: DriverConfig): Record<string, string> {
  if (!volume) return {};
  return {
    [ATTR_METADATA_STYLE]: volumeMetadataStyle(volume, config),
    ...inheritedProfileAttributes(volume.attributes),
  };
}
