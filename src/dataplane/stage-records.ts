/**
 * What this node has staged and published, one JSON file a volume under <stateDir>/node/, replaced
 * atomically (write a temporary file, fsync, rename, fsync the directory). A restarted plugin reads them
 * to know which loop devices, mounts and targets are its own.
 */
import fs from 'node:fs';
import path from 'node:path';
import { isVolumeId } from '../../storage-engine/index.js';

/** How a volume is staged: the parts of a volume capability that change what the node does. */
export type StagedAccess =
  | { kind: 'block' }
  | { kind: 'mount'; fsType: string; mountFlags: string[] };

export interface PublishRecord {
  readonly: boolean;
  /** Identity of the publish request's capability (access type, flags, mode), for idempotency. */
  capabilityKey: string;
  /** Access mode number of the request. */
  accessMode: number;
  /** Published for a single writer: no other target may be added while it exists. */
  exclusive: boolean;
  /** A read-only loop device made for this target (read-only block publish), if any. */
  device?: string;
  /** Generation of the volume-file mount the published device belongs to. */
  generation: string;
}

/** A loop device attached to a volume file, with the identity of that file. */
export interface DeviceRecord {
  name: string;
  /** Generation of the mount the file was in. */
  generation: string;
}

export interface StageRecord {
  volumeId: string;
  stagingPath: string;
  access: StagedAccess;
  accessMode: number;
  /** The stage request's capability identity, for idempotency. */
  capabilityKey: string;
  /** Staged read-only (SINGLE_NODE_READER_ONLY): read-only device, read-only mount. */
  readOnly: boolean;
  /** The loop device; undefined while staging is half done, or once it is gone (after a reboot). */
  device: DeviceRecord | undefined;
  /** Devices of earlier generations still attached because a target may reference them; detached at unstage. */
  retiredDevices: DeviceRecord[];
  publishes: Record<string, PublishRecord>;
}

export class StageRecords {
  constructor(readonly dir: string) {}

  private file(volumeId: string): string {
    // Volume IDs are checked before they become file names.
    if (!isVolumeId(volumeId)) throw new RangeError(`not a volume ID: ${JSON.stringify(String(volumeId).slice(0, 64))}`);
    return path.join(this.dir, `${volumeId}.json`);
  }

  get(volumeId: string): StageRecord | undefined {
    if (!isVolumeId(volumeId)) return undefined;
    try {
      return JSON.parse(fs.readFileSync(this.file(volumeId), 'utf8')) as StageRecord;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
  }

  /** Every record; unreadable files are reported through `onBad` and skipped. */
  list(onBad: (file: string, err: unknown) => void = () => undefined): StageRecord[] {
    let names: string[];
    try {
      names = fs.readdirSync(this.dir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw err;
    }
    const out: StageRecord[] = [];
    for (const name of names.sort()) {
      if (!name.endsWith('.json')) {
        // A temporary file of a write that a crash interrupted.
        if (name.endsWith('.tmp')) fs.rmSync(path.join(this.dir, name), { force: true });
        continue;
      }
      const volumeId = name.slice(0, -'.json'.length);
      try {
        const record = this.get(volumeId);
        if (record && record.volumeId === volumeId) out.push(record);
        else onBad(name, new Error('record names another volume'));
      } catch (err) {
        onBad(name, err);
      }
    }
    return out;
  }

  put(record: StageRecord): void {
    const target = this.file(record.volumeId);
    fs.mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    const tmp = `${target}.tmp`;
    const fd = fs.openSync(tmp, 'w', 0o600);
    try {
      fs.writeSync(fd, JSON.stringify(record, null, 2));
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, target);
    syncDir(this.dir);
  }

  delete(volumeId: string): void {
    fs.rmSync(this.file(volumeId), { force: true });
    syncDir(this.dir);
  }
}

function syncDir(dir: string): void {
  let fd: number | undefined;
  try {
    fd = fs.openSync(dir, 'r');
    fs.fsyncSync(fd);
  } catch {
    // The directory may not exist yet (nothing written); there is nothing to make durable then.
  } finally {
    if (fd !== undefined) fs.closeSync(fd);
  }
}
