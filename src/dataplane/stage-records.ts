/**
 * What this node has staged and published, under <stateDir>/node/:
 *   <volumeId>.json                      the staging (replaced atomically: temporary file, fsync, rename)
 *   <volumeId>.publishes/<sha256>.json   one file a publication, named by the hash of its target_path
 * A restarted plugin reads them to know which loop devices, mounts, targets and created paths are its own.
 *
 * One file a publication so that taking things down needs no new space: unpublishing is an unlink, and
 * unstaging unlinks the (then empty) directory and the staging file. On a full state filesystem those
 * still work; writing a record (stage, publish) fails with a 'resource-exhausted' NodeError instead.
 *
 * Records written by earlier versions kept the publications inside <volumeId>.json; they are read as they
 * are, moved into their own files on the next write of the staging, and removing one of them before that
 * rewrites <volumeId>.json (the one case that needs space to take something down).
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { isVolumeId } from '../../storage-engine/index.js';
import type { Created } from './node-paths.js';
import { NodeError, isNoSpace } from './node-errors.js';

/** How a volume is staged: the parts of a volume capability that change what the node does. */
export type StagedAccess = { kind: 'block' } | { kind: 'mount'; fsType: string; mountFlags: string[] };

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
  /** The target with its parent resolved through symlinks: where the mount is. Absent in old records. */
  realPath?: string;
  /** What the driver created at the target, the only thing it removes there. Absent in old records. */
  created?: Created;
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
  /** The staging path with its parent resolved through symlinks. Absent in old records. */
  stagingRealPath?: string;
  /** What the driver created at the staging path. Absent in old records (nothing is removed then). */
  stagingCreated?: Created;
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
  /** By target_path; read from the publication files (and old records), never written into the staging file. */
  publishes: Record<string, PublishRecord>;
}

interface PublishFile extends PublishRecord {
  targetPath: string;
}

export class StageRecords {
  constructor(readonly dir: string) {}

  private file(volumeId: string): string {
    // Volume IDs are checked before they become file names.
    if (!isVolumeId(volumeId))
      throw new RangeError(`not a volume ID: ${JSON.stringify(String(volumeId).slice(0, 64))}`);
    return path.join(this.dir, `${volumeId}.json`);
  }

  private publishDir(volumeId: string): string {
    return `${this.file(volumeId).slice(0, -'.json'.length)}.publishes`;
  }

  private publishFile(volumeId: string, targetPath: string): string {
    return path.join(this.publishDir(volumeId), `${createHash('sha256').update(targetPath).digest('hex')}.json`);
  }

  get(volumeId: string): StageRecord | undefined {
    if (!isVolumeId(volumeId)) return undefined;
    const record = readJson<StageRecord>(this.file(volumeId));
    if (!record) return undefined;
    record.publishes ??= {};
    for (const pub of this.readPublishes(volumeId)) {
      const { targetPath, ...rest } = pub;
      record.publishes[targetPath] = rest;
    }
    return record;
  }

  private readPublishes(volumeId: string): PublishFile[] {
    const dir = this.publishDir(volumeId);
    let names: string[];
    try {
      names = fs.readdirSync(dir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw err;
    }
    const out: PublishFile[] = [];
    for (const name of names.sort()) {
      if (name.endsWith('.tmp')) {
        fs.rmSync(path.join(dir, name), { force: true });
        continue;
      }
      const pub = readJson<PublishFile>(path.join(dir, name));
      if (pub && typeof pub.targetPath === 'string') out.push(pub);
    }
    return out;
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

  /**
   * Writes the staging (not its publications: those have their own files). Publications an old record
   * still carried inside it get their own files first, so none is lost.
   */
  put(record: StageRecord): void {
    for (const [targetPath, pub] of Object.entries(record.publishes)) {
      if (!fs.existsSync(this.publishFile(record.volumeId, targetPath)))
        this.putPublish(record.volumeId, targetPath, pub);
    }
    const { publishes: _publishes, ...staging } = record;
    this.write(this.file(record.volumeId), { ...staging, publishes: {} }, `the staging of volume ${record.volumeId}`);
  }

  /** Records (or replaces) one publication. Needs space: 'resource-exhausted' when there is none. */
  putPublish(volumeId: string, targetPath: string, pub: PublishRecord): void {
    const file: PublishFile = { targetPath, ...pub };
    this.write(this.publishFile(volumeId, targetPath), file, `the publication of volume ${volumeId}`);
  }

  /** Forgets one publication: an unlink, which needs no space (unless an old record still holds it). */
  deletePublish(volumeId: string, targetPath: string): void {
    fs.rmSync(this.publishFile(volumeId, targetPath), { force: true });
    syncDir(this.publishDir(volumeId));
    const legacy = readJson<StageRecord>(this.file(volumeId));
    if (legacy?.publishes && targetPath in legacy.publishes) {
      delete legacy.publishes[targetPath];
      this.write(this.file(volumeId), legacy, `the staging of volume ${volumeId}`);
    }
  }

  /** Forgets the staging and any publication file left: unlinks and an rmdir, no space needed. */
  delete(volumeId: string): void {
    const dir = this.publishDir(volumeId);
    // Publications first: a staging file never outlives a crash with stray publications beside it missing.
    fs.rmSync(dir, { recursive: true, force: true });
    fs.rmSync(this.file(volumeId), { force: true });
    syncDir(this.dir);
  }

  private write(target: string, value: unknown, what: string): void {
    const tmp = `${target}.tmp`;
    try {
      fs.mkdirSync(path.dirname(target), { recursive: true, mode: 0o700 });
      const fd = fs.openSync(tmp, 'w', 0o600);
      try {
        fs.writeSync(fd, JSON.stringify(value, null, 2));
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
      fs.renameSync(tmp, target);
    } catch (err) {
      fs.rmSync(tmp, { force: true });
      if (isNoSpace(err)) {
        throw new NodeError(
          'resource-exhausted',
          `no space left on the state filesystem (${this.dir}) to record ${what}: free space there and retry`,
        );
      }
      throw err;
    }
    syncDir(path.dirname(target));
  }
}

function readJson<T>(file: string): T | undefined {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8')) as T;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}

function syncDir(dir: string): void {
  let fd: number | undefined;
  try {
    fd = fs.openSync(dir, 'r');
    fs.fsyncSync(fd);
  } catch {
    // The directory may not exist (nothing written yet, or just removed); there is nothing to make durable then.
  } finally {
    if (fd !== undefined) fs.closeSync(fd);
  }
}
