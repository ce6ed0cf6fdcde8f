/**
 * Invariant 6: one process owns a store directory, by a kernel file lock held while the store is open.
 * A second opener (another process, or this one again) is refused with BusyError naming the directory;
 * the lock dies with its owner, so a killed owner never blocks the next start; PIDs play no part, so PID
 * namespaces (two containers sharing a hostPath, both PID 1) change nothing.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { BlockStore, BusyError } from '../../storage-engine/index.js';
import { REPO_ROOT, TSX_LOADER as TSX } from '../support/test-driver.js';

const children: ChildProcess[] = [];
const dirs: string[] = [];
const HOLDER = path.join(REPO_ROOT, 'test/engine/support/hold-store.ts');

afterEach(() => {
  for (const c of children.splice(0)) c.kill('SIGKILL');
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

function tempStoreDir(): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-owner-'));
  dirs.push(dir);
  return dir;
}

interface Holder {
  child: ChildProcess;
  /** Its PID as it sees itself (1 inside its own PID namespace). */
  ownPid: number;
}

/** Starts a process that opens the store and keeps it; `command` may wrap node (e.g. in unshare). */
async function holdInChild(dir: string, wrapper: string[] = []): Promise<Holder> {
  const argv = [...wrapper, process.execPath, '--import', TSX, HOLDER, dir];
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  let err = '';
  child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  const ownPid = await new Promise<number>((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (b: Buffer) => {
      out += b.toString();
      const m = /ready pid=(\d+)/.exec(out);
      if (m) resolve(Number(m[1]));
    });
    child.once('exit', (code) => reject(new HolderRefused(code, err)));
  });
  return { child, ownPid };
}

/**
 * The holder's layer files once its store has made, in the background, the spare file for its next layer
 * (the holder's volume head plus that spare): a listing taken earlier would race with it.
 */
async function settledLayerFiles(dir: string): Promise<string[]> {
  const list = () => fs.readdirSync(path.join(dir, 'layers')).sort();
  await vi.waitFor(() => expect(list()).toHaveLength(2), { timeout: 10_000 });
  return list();
}

class HolderRefused extends Error {
  constructor(
    readonly exitCode: number | null,
    readonly stderr: string,
  ) {
    super(`holder exited with ${exitCode}: ${stderr}`);
  }
}

function openError(dir: string): unknown {
  try {
    const store = BlockStore.open(dir);
    void store.close();
  } catch (err) {
    return err;
  }
  return undefined;
}

describe('store ownership', () => {
  it('a store open in another live process is refused with BusyError naming the directory, and nothing in it changes', async () => {
    const dir = tempStoreDir();
    const holder = await holdInChild(dir);
    const before = await settledLayerFiles(dir);
    const caught = openError(dir);
    expect(caught).toBeInstanceOf(BusyError);
    expect((caught as BusyError).message).toContain(dir);
    expect((caught as BusyError).message).toContain(String(holder.child.pid));
    expect(fs.readdirSync(path.join(dir, 'layers')).sort()).toEqual(before);
  });

  it('a second open of the same directory in the same process is refused; after close it opens again', async () => {
    const dir = tempStoreDir();
    const first = BlockStore.open(dir, { autoCompact: false });
    try {
      const caught = openError(dir);
      expect(caught).toBeInstanceOf(BusyError);
      expect((caught as BusyError).message).toContain(dir);
      await first.createVolume({ name: 'still-mine', capacityBytes: 1 << 20 });
    } finally {
      await first.close();
    }
    const again = BlockStore.open(dir, { autoCompact: false });
    expect(again.findVolumeByName('still-mine')).toBeDefined();
    await again.close();
  });

  it('the lock of an owner killed with SIGKILL dies with it: the next open takes the store over and sees its data', async () => {
    const dir = tempStoreDir();
    const { child } = await holdInChild(dir);
    child.kill('SIGKILL');
    await new Promise((resolve) => child.once('exit', resolve));
    const store = BlockStore.open(dir);
    try {
      expect(store.findVolumeByName('held')).toBeDefined();
    } finally {
      await store.close();
    }
  });

  it("an earlier version's owner.pid naming a live process neither blocks the open nor survives it", async () => {
    const dir = tempStoreDir();
    await BlockStore.open(dir).close();
    // PID 1 is always alive: the PID-file lock read this as "in use".
    fs.writeFileSync(path.join(dir, 'owner.pid'), '1\n');
    const store = BlockStore.open(dir);
    await store.close();
    expect(fs.existsSync(path.join(dir, 'owner.pid'))).toBe(false);
  });

  it('the lock file is 0600 whatever the umask', async () => {
    const dir = tempStoreDir();
    const old = process.umask(0);
    try {
      await BlockStore.open(dir).close();
    } finally {
      process.umask(old);
    }
    expect(fs.statSync(path.join(dir, 'store.lock')).mode & 0o777).toBe(0o600);
  });
});

/** Why processes cannot be started in their own PID namespace here, or undefined if they can. */
function missingPidNamespaces(): string | undefined {
  if (process.platform !== 'linux') return 'PID namespaces need Linux';
  if (process.getuid?.() !== 0) return 'unshare --pid needs root';
  const probe = spawnSync('unshare', ['--pid', '--fork', '--mount-proc', 'true'], { stdio: 'ignore' });
  if (probe.error || probe.status !== 0) return 'unshare --pid --fork --mount-proc (util-linux) does not work here';
  return undefined;
}

const missing = missingPidNamespaces();
const mustRun = process.env.CI === 'true';
/** Each child runs as PID 1 of a new PID namespace; SIGKILL to unshare kills it (--kill-child). */
const OWN_PID_NAMESPACE = ['unshare', '--pid', '--fork', '--mount-proc', '--kill-child'];

/** The host PID of the process unshare forked (the one that is PID 1 inside). */
function forkedChildPid(unsharePid: number): number {
  const pids = fs.readFileSync(`/proc/${unsharePid}/task/${unsharePid}/children`, 'utf8').trim().split(/\s+/);
  expect(pids).toHaveLength(1);
  return Number(pids[0]);
}

async function waitUntilGone(pid: number): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (fs.existsSync(`/proc/${pid}`)) {
    if (Date.now() > deadline) throw new Error(`process ${pid} did not exit`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

describe.skipIf(missing !== undefined && !mustRun)(
  `store ownership across PID namespaces${missing ? ` (skipped: ${missing})` : ''}`,
  () => {
    beforeAll(() => {
      if (missing) throw new Error(`CI=true but PID-namespace tests cannot run: ${missing}`);
    });

    it('two drivers that are both PID 1 in their own PID namespace: the second is refused with BusyError naming the directory', async () => {
      const dir = tempStoreDir();
      const first = await holdInChild(dir, OWN_PID_NAMESPACE);
      expect(first.ownPid).toBe(1);
      const before = await settledLayerFiles(dir);
      const second = await holdInChild(dir, OWN_PID_NAMESPACE).then(
        () => undefined,
        (err: unknown) => err,
      );
      expect(second).toBeInstanceOf(HolderRefused);
      expect((second as HolderRefused).exitCode).not.toBe(0);
      expect((second as HolderRefused).stderr).toContain('BusyError');
      expect((second as HolderRefused).stderr).toContain(dir);
      expect(fs.readdirSync(path.join(dir, 'layers')).sort()).toEqual(before);
    }, 30_000);

    it('after a PID-1 owner is SIGKILLed, a new opener succeeds although a live process (our PID 1) has its PID', async () => {
      const dir = tempStoreDir();
      const owner = await holdInChild(dir, OWN_PID_NAMESPACE);
      expect(owner.ownPid).toBe(1);
      const pid1 = forkedChildPid(owner.child.pid!);
      process.kill(pid1, 'SIGKILL');
      await waitUntilGone(pid1);
      // PID 1 of this namespace is alive, as it always is.
      expect(fs.existsSync('/proc/1')).toBe(true);
      const store = BlockStore.open(dir, { autoCompact: false });
      try {
        expect(store.findVolumeByName('held')).toBeDefined();
      } finally {
        await store.close();
      }
    }, 30_000);
  },
);
