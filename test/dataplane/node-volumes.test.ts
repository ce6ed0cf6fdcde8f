/**
 * NodeVolumes' stage/publish/unpublish/unstage/restart state machine, without root: a real block store and
 * real temporary directories for the CO's paths and the records, and a host that keeps mounts and loop
 * devices in memory (support/fake-host.ts). The same state machine runs against the real host in
 * node-service.test.ts, node-restart.test.ts, node-full-disk.test.ts and the e2e tests.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { BlockStore, NotFoundError } from '../../storage-engine/index.js';
import { createLogger } from '../../src/logging.js';
import { NodeError, NodeVolumes, type PublishRequest, type StageRequest } from '../../src/dataplane/node-volumes.js';
import { FakeHost, FakeVolumeFiles } from './support/fake-host.js';

const MiB = 2 ** 20;
const BLOCK_KEY = JSON.stringify(['block', 1]);
const MOUNT_KEY = JSON.stringify(['mount', '', [], 1]);

interface World {
  dir: string;
  stateDir: string;
  store: BlockStore;
  host: FakeHost;
  files: FakeVolumeFiles;
  nv: NodeVolumes;
  logs: string[];
}

let w: World;

/** A driver instance on the world's store and host (a restart makes a new one). */
async function startInstance(): Promise<void> {
  w.files = new FakeVolumeFiles(w.host, w.store, path.join(w.stateDir, 'fuse'));
  const logger = createLogger('info', { write: (line: string) => void w.logs.push(line) });
  w.nv = new NodeVolumes({ store: w.store, stateDir: w.stateDir, logger, host: w.host, files: w.files });
  await w.nv.start();
}

beforeEach(async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-nv-'));
  const stateDir = path.join(dir, 'state');
  fs.mkdirSync(path.join(dir, 'pods'));
  fs.mkdirSync(path.join(dir, 'staging'));
  w = {
    dir,
    stateDir,
    store: BlockStore.open(path.join(stateDir, 'store'), { autoCompact: false }),
    host: new FakeHost(),
    logs: [],
  } as unknown as World;
  await startInstance();
});

afterEach(async () => {
  await w.store.close();
  fs.rmSync(w.dir, { recursive: true, force: true });
});

async function volume(bytes = 8 * MiB): Promise<string> {
  return (await w.store.createVolume({ name: `v-${Math.random()}`, capacityBytes: bytes })).id;
}

const p = (...parts: string[]) => path.join(w.dir, ...parts);

function stageReq(volumeId: string, kind: 'block' | 'mount', stagingPath = p('staging', volumeId)): StageRequest {
  return {
    volumeId,
    stagingPath,
    access: kind === 'block' ? { kind } : { kind, fsType: '', mountFlags: [] },
    accessMode: 1,
    readOnly: false,
    capabilityKey: kind === 'block' ? BLOCK_KEY : MOUNT_KEY,
  };
}

function publishReq(volumeId: string, kind: 'block' | 'mount', targetPath: string, readonly = false): PublishRequest {
  return {
    volumeId,
    stagingPath: p('staging', volumeId),
    targetPath,
    accessKind: kind,
    accessMode: 7,
    readonly,
    capabilityKey: kind === 'block' ? BLOCK_KEY : MOUNT_KEY,
    exclusive: false,
  };
}

async function staged(kind: 'block' | 'mount', bytes?: number): Promise<string> {
  const vol = await volume(bytes);
  fs.mkdirSync(p('staging', vol));
  await w.nv.stage(stageReq(vol, kind));
  return vol;
}

/** The NodeError a call fails with. */
async function refusal(call: Promise<unknown>): Promise<NodeError> {
  const err = await call.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (!(err instanceof NodeError)) throw new Error(`expected a NodeError, got ${String(err)}`);
  return err;
}

const publicationFiles = (vol: string) => {
  const dir = path.join(w.stateDir, 'node', `${vol}.publishes`);
  return fs.existsSync(dir) ? fs.readdirSync(dir) : [];
};

describe('stage and unstage', () => {
  it('stage (mount) attaches a device, makes a filesystem once and mounts it at the staging path; a repeat changes nothing; unstage undoes it all', async () => {
    const vol = await staged('mount');
    const staging = p('staging', vol);
    expect(w.host.mountsAt(staging).map((m) => m.fsType)).toEqual(['ext4']);
    expect(w.host.devices.size).toBe(1);
    await w.nv.stage(stageReq(vol, 'mount'));
    expect(w.host.calls.filter(([op]) => op === 'makeFilesystem' || op === 'attachLoopDevice')).toHaveLength(2);
    await w.nv.unstage(vol, staging);
    expect(w.host.mounts).toEqual([]);
    expect(w.host.devices.size).toBe(0);
    // The CO made the staging directory: it stays. Staged again, the filesystem is not made again.
    expect(fs.statSync(staging).isDirectory()).toBe(true);
    await w.nv.stage(stageReq(vol, 'mount'));
    expect(w.host.calls.filter(([op]) => op === 'makeFilesystem')).toHaveLength(1);
  });

  it('stage (mount) at an absent staging path creates the directory and unstage removes it', async () => {
    const vol = await volume();
    const staging = p('staging', 'absent');
    await w.nv.stage(stageReq(vol, 'mount', staging));
    expect(fs.statSync(staging).isDirectory() && (await w.host.isMountPoint(staging))).toBe(true);
    await w.nv.unstage(vol, staging);
    expect(fs.existsSync(staging)).toBe(false);
  });

  it('stage refuses a non-empty staging directory, a file, a symlink, a path inside the state directory and a missing parent; nothing is recorded, held or attached', async () => {
    const vol = await volume();
    const full = p('staging', 'full');
    fs.mkdirSync(full);
    fs.writeFileSync(path.join(full, 'keep'), 'x');
    const file = p('staging', 'file');
    fs.writeFileSync(file, '');
    const link = p('staging', 'link');
    fs.symlinkSync(p('pods'), link);
    fs.symlinkSync(w.stateDir, p('state-link'));
    const cases: Array<[string, NodeError['kind']]> = [
      [full, 'failed-precondition'],
      [file, 'failed-precondition'],
      [link, 'failed-precondition'],
      [path.join(w.stateDir, 'staging'), 'invalid-argument'],
      [p('state-link', 'staging'), 'invalid-argument'],
      [p('no-such-parent', 'staging'), 'failed-precondition'],
    ];
    for (const [stagingPath, kind] of cases) {
      const err = await refusal(w.nv.stage(stageReq(vol, 'mount', stagingPath)));
      expect([stagingPath, err.kind]).toEqual([stagingPath, kind]);
      expect(err.message).toContain(stagingPath);
    }
    expect(w.host.mounts).toEqual([]);
    expect(w.host.devices.size).toBe(0);
    expect(fs.existsSync(path.join(w.stateDir, 'node', `${vol}.json`))).toBe(false);
    await w.store.deleteVolume(vol); // not held
  });

  it('a staging directory left with files after the unmount is reported and left; unstage still completes', async () => {
    const vol = await volume();
    const staging = p('staging', 'created-here');
    await w.nv.stage(stageReq(vol, 'mount', staging));
    // The mount goes away behind the driver's back and something writes into the bare directory.
    await w.host.unmountAll(staging);
    fs.writeFileSync(path.join(staging, 'stray'), 'x');
    await w.nv.unstage(vol, staging);
    expect(fs.readFileSync(path.join(staging, 'stray'), 'utf8')).toBe('x');
    expect(w.logs.some((l) => l.includes('files are left in it after the unmount'))).toBe(true);
    await w.store.deleteVolume(vol);
  });
});

describe('publish and unpublish', () => {
  it('publish (block) creates an empty file at an absent target and bind-mounts the device; unpublish unmounts and removes only that file', async () => {
    const vol = await staged('block');
    const target = p('pods', 'dev');
    await w.nv.publish(publishReq(vol, 'block', target));
    expect(w.host.mountsAt(target).map((m) => m.source)).toEqual([...w.host.devices.keys()]);
    expect(fs.lstatSync(target).isFile()).toBe(true);
    await w.nv.publish(publishReq(vol, 'block', target)); // idempotent
    expect(w.host.mountsAt(target)).toHaveLength(1);
    await w.nv.unpublish(vol, target);
    expect(await w.host.isMountPoint(target)).toBe(false);
    expect(fs.existsSync(target)).toBe(false);
  });

  it('publish (block) on an existing empty file uses it and leaves it at unpublish', async () => {
    const vol = await staged('block');
    const target = p('pods', 'co-file');
    fs.writeFileSync(target, '');
    await w.nv.publish(publishReq(vol, 'block', target));
    await w.nv.unpublish(vol, target);
    expect(fs.lstatSync(target).isFile()).toBe(true);
  });

  it('publish (mount) on an empty directory the CO made uses it and leaves it at unpublish; an absent one is created and removed', async () => {
    const vol = await staged('mount');
    const made = p('pods', 'made');
    fs.mkdirSync(made);
    const absent = p('pods', 'absent');
    await w.nv.publish(publishReq(vol, 'mount', made));
    await w.nv.publish(publishReq(vol, 'mount', absent));
    expect(w.host.mountsAt(made)[0]?.source).toBe(p('staging', vol));
    for (const t of [made, absent]) await w.nv.unpublish(vol, t);
    expect(fs.statSync(made).isDirectory()).toBe(true);
    expect(fs.existsSync(absent)).toBe(false);
  });

  it('publish refuses what the driver does not own, naming the path; nothing is mounted, created or recorded', async () => {
    const blockVol = await staged('block');
    const mountVol = await staged('mount');
    const nonEmpty = p('pods', 'non-empty');
    fs.writeFileSync(nonEmpty, 'data');
    const dir = p('pods', 'dir');
    fs.mkdirSync(dir);
    const fullDir = p('pods', 'full-dir');
    fs.mkdirSync(fullDir);
    fs.writeFileSync(path.join(fullDir, 'f'), 'x');
    const emptyFile = p('pods', 'empty-file');
    fs.writeFileSync(emptyFile, '');
    const link = p('pods', 'link');
    fs.symlinkSync(p('staging'), link);
    fs.symlinkSync(w.stateDir, p('state-link'));
    const layer = path.join(w.stateDir, 'store');
    const cases: Array<[string, 'block' | 'mount', NodeError['kind']]> = [
      [nonEmpty, 'block', 'failed-precondition'],
      [dir, 'block', 'failed-precondition'],
      [link, 'block', 'failed-precondition'],
      [fullDir, 'mount', 'failed-precondition'],
      [emptyFile, 'mount', 'failed-precondition'],
      [link, 'mount', 'failed-precondition'],
      [path.join(w.stateDir, 'target'), 'block', 'invalid-argument'],
      [p('state-link', 'target'), 'mount', 'invalid-argument'],
      [layer, 'block', 'invalid-argument'],
      [w.dir, 'mount', 'invalid-argument'], // contains the state directory
      [p('pods', 'missing', 'target'), 'mount', 'failed-precondition'],
    ];
    for (const [target, kind, expected] of cases) {
      const err = await refusal(w.nv.publish(publishReq(kind === 'block' ? blockVol : mountVol, kind, target)));
      expect([target, kind, err.kind]).toEqual([target, kind, expected]);
      expect(err.message).toContain(target);
    }
    expect(w.host.mounts.map((m) => m.target)).toEqual([p('staging', mountVol)]);
    expect(fs.readFileSync(nonEmpty, 'utf8')).toBe('data');
    expect(fs.lstatSync(link).isSymbolicLink() && fs.existsSync(path.join(fullDir, 'f'))).toBe(true);
    expect(fs.existsSync(path.join(w.stateDir, 'target')) || fs.existsSync(p('pods', 'missing'))).toBe(false);
    expect([...publicationFiles(blockVol), ...publicationFiles(mountVol)]).toEqual([]);
  });

  it('unpublish of a target that was never published is OK and touches nothing (no host call, the path stays)', async () => {
    const vol = await staged('mount');
    const emptyDir = p('pods', 'not-ours');
    fs.mkdirSync(emptyDir);
    const calls = w.host.calls.length;
    await w.nv.unpublish(vol, emptyDir);
    await w.nv.unpublish(vol, p('pods', 'absent'));
    expect(w.host.calls.slice(calls)).toEqual([]);
    expect(fs.statSync(emptyDir).isDirectory()).toBe(true);
  });

  it('a target left with files after the unmount: unpublish is OK, the files stay, a warning names the path, the record is dropped and unstage and delete work', async () => {
    const vol = await staged('mount');
    const target = p('pods', 'leftover');
    await w.nv.publish(publishReq(vol, 'mount', target));
    await w.host.unmountAll(target);
    fs.writeFileSync(path.join(target, 'stray'), 'x');
    await w.nv.unpublish(vol, target);
    expect(fs.readFileSync(path.join(target, 'stray'), 'utf8')).toBe('x');
    expect(w.logs.some((l) => l.includes(target) && l.includes('files are left in it after the unmount'))).toBe(true);
    expect(publicationFiles(vol)).toEqual([]);
    await w.nv.unstage(vol, p('staging', vol));
    await w.store.deleteVolume(vol);
  });

  it('a failed bind mount undoes the publish: the created target, the read-only device and the record are gone', async () => {
    const vol = await staged('block');
    const target = p('pods', 'fails');
    w.host.failNext('bindMount', new Error('mount: simulated failure'));
    await expect(w.nv.publish(publishReq(vol, 'block', target, true))).rejects.toThrow(/simulated/);
    expect(fs.existsSync(target)).toBe(false);
    expect(w.host.devices.size).toBe(1);
    expect(publicationFiles(vol)).toEqual([]);
  });

  it('unpublish and unstage write no record: a publication is one file that unpublish unlinks, and the staging file is not rewritten', async () => {
    const vol = await staged('block');
    const stagingFile = path.join(w.stateDir, 'node', `${vol}.json`);
    const targets = [p('pods', 'a'), p('pods', 'b')];
    for (const t of targets) await w.nv.publish(publishReq(vol, 'block', t));
    expect(publicationFiles(vol)).toHaveLength(2);
    const before = fs.statSync(stagingFile);
    await w.nv.unpublish(vol, targets[0]!);
    const after = fs.statSync(stagingFile);
    expect([after.ino, after.mtimeMs]).toEqual([before.ino, before.mtimeMs]);
    expect(publicationFiles(vol)).toHaveLength(1);
    await w.nv.unpublish(vol, targets[1]!);
    await w.nv.unstage(vol, p('staging', vol));
    expect(fs.readdirSync(path.join(w.stateDir, 'node'))).toEqual([]);
  });
});

describe('restart', () => {
  it('a restarted instance holds staged volumes, reports their dead devices, refuses to publish on them, and unpublish + unstage + stage bring them back', async () => {
    const vol = await staged('block');
    const target = p('pods', 'dev');
    await w.nv.publish(publishReq(vol, 'block', target));
    const oldDevice = [...w.host.devices.keys()][0]!;
    w.files.kill();
    await startInstance();
    await expect(w.store.deleteVolume(vol)).rejects.toThrow();
    expect((await w.nv.stats(vol, target)).condition.abnormal).toBe(true);
    expect((await refusal(w.nv.publish(publishReq(vol, 'block', p('pods', 'other'))))).kind).toBe(
      'failed-precondition',
    );
    await w.nv.unpublish(vol, target);
    expect(fs.existsSync(target)).toBe(false);
    await w.nv.unstage(vol, p('staging', vol));
    expect(w.host.devices.has(oldDevice)).toBe(false);
    await w.nv.stage(stageReq(vol, 'block'));
    await w.nv.publish(publishReq(vol, 'block', target));
    expect((await w.nv.stats(vol, target)).condition.abnormal).toBe(false);
  });

  it('after a reboot, a recorded device number that now serves another file is left attached at unstage', async () => {
    const vol = await staged('block');
    const recorded = [...w.host.devices.keys()][0];
    w.files.kill();
    w.host.reboot();
    const foreign = w.host.attachForeign('/var/lib/someone-else.img');
    expect(foreign).toBe(recorded); // numbering starts again at boot: the recorded number is someone else's now
    await startInstance();
    await w.nv.unstage(vol, p('staging', vol));
    expect(w.host.devices.get(foreign)?.backFile).toBe('/var/lib/someone-else.img');
  });

  it('records of an earlier version (publications inside the staging file) are read, and unpublish removes them', async () => {
    const vol = await staged('mount');
    const target = p('pods', 'old');
    await w.nv.publish(publishReq(vol, 'mount', target));
    // Rewrite the records as the earlier version laid them out: one file, publications inside, no created/realPath.
    const nodeDir = path.join(w.stateDir, 'node');
    const stagingFile = path.join(nodeDir, `${vol}.json`);
    const rec = JSON.parse(fs.readFileSync(stagingFile, 'utf8')) as Record<string, unknown>;
    const [pubName] = publicationFiles(vol);
    const {
      targetPath,
      realPath: _r,
      created: _c,
      ...pub
    } = JSON.parse(fs.readFileSync(path.join(nodeDir, `${vol}.publishes`, pubName!), 'utf8')) as Record<
      string,
      unknown
    >;
    const { stagingRealPath: _s, stagingCreated: _sc, ...legacy } = rec;
    fs.rmSync(path.join(nodeDir, `${vol}.publishes`), { recursive: true });
    fs.writeFileSync(stagingFile, JSON.stringify({ ...legacy, publishes: { [targetPath as string]: pub } }));
    await startInstance();
    expect((await w.nv.stats(vol, target)).kind).toBe('mount');
    await w.nv.unpublish(vol, target);
    expect(await w.host.isMountPoint(target)).toBe(false);
    expect(fs.existsSync(target)).toBe(false);
    await w.nv.unstage(vol, p('staging', vol));
  });
});

describe('expand', () => {
  it('NodeExpandVolume refreshes every loop device of the volume (the staged one and each read-only target device) after the file grows', async () => {
    const vol = await staged('block', 8 * MiB);
    await w.nv.publish({ ...publishReq(vol, 'block', p('pods', 'rw')) });
    await w.nv.publish({ ...publishReq(vol, 'block', p('pods', 'ro'), true) });
    expect([...w.host.devices.values()].map((d) => d.sizeBytes)).toEqual([8 * MiB, 8 * MiB]);
    await w.store.growVolume(vol, 12 * MiB);
    expect(await w.nv.expand(vol, p('pods', 'rw'), 12 * MiB)).toBe(12 * MiB);
    expect([...w.host.devices.values()].map((d) => d.sizeBytes)).toEqual([12 * MiB, 12 * MiB]);
  });
});

describe('a volume deleted while it is being staged', () => {
  it('DeleteVolume landing while NodeStageVolume checks its path: stage is NOT_FOUND and records nothing, holds nothing, attaches nothing', async () => {
    const vol = await volume();
    const realpath = fs.promises.realpath;
    // The controller deletes the volume (not yet held) while stage resolves the staging path.
    const spy = vi.spyOn(fs.promises, 'realpath').mockImplementation(async (...args) => {
      spy.mockRestore();
      await w.store.deleteVolume(vol);
      return realpath(...(args as Parameters<typeof realpath>));
    });
    const err = await w.nv.stage(stageReq(vol, 'mount')).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(NotFoundError);
    expect(fs.existsSync(path.join(w.stateDir, 'node', `${vol}.json`))).toBe(false);
    expect(w.host.devices.size).toBe(0);
    // A restart finds nothing staged to warn about.
    await startInstance();
    expect(w.logs.some((l) => l.includes('no longer in the store'))).toBe(false);
  });
});

describe('one volume at a time', () => {
  it('calls for one volume run in order: a publish sent right after a stage waits for it', async () => {
    const vol = await volume();
    fs.mkdirSync(p('staging', vol));
    const stage = w.nv.stage(stageReq(vol, 'mount'));
    const publish = w.nv.publish(publishReq(vol, 'mount', p('pods', 'ordered')));
    const unpublish = w.nv.unpublish(vol, p('pods', 'ordered'));
    await Promise.all([stage, publish, unpublish]);
    const ops = w.host.calls.map(([op]) => op);
    expect(ops.indexOf('bindMount')).toBeGreaterThan(ops.indexOf('mountFilesystem'));
    expect(ops.lastIndexOf('unmountAll')).toBeGreaterThan(ops.indexOf('bindMount'));
  });
});
