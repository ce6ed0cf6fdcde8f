/**
 * `cbt-csi serve` as a separate process, the way a container runs it: what it prints, how it talks
 * over its socket, how it logs and counts RPCs, how it shuts down, and how it refuses bad flags.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, test } from 'vitest';
import { status } from '@grpc/grpc-js';
import { BlockStore } from '../../storage-engine/index.js';
import { Controller, Identity, SnapshotMetadata } from '../../src/gen/csi/v1/csi_pb.js';
import { codeOf, ServiceClient } from '../support/csi-client.js';
import { REPO_ROOT, TSX_LOADER, spawnDriver } from '../support/test-driver.js';

const pkg = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'package.json'), 'utf8')) as { version: string };

// ------------------------------------------------------------------ fixtures

const dirs: string[] = [];
const children: ChildProcess[] = [];
const clients: { close(): void }[] = [];

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  for (const child of children.splice(0)) {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL');
      await exited(child);
    }
  }
  for (const dir of dirs.splice(0)) fs.rmSync(dir, { recursive: true, force: true });
});

function tempDir(): string {
  const dir = fs.realpathSync(fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-csi-cli-')));
  dirs.push(dir);
  return dir;
}

async function serve(args: string[], options: { cwd?: string; env?: NodeJS.ProcessEnv; umask?: number } = {}) {
  const running = await spawnDriver(args, { ...options, env: { CSI_ENDPOINT: undefined, ...options.env } });
  children.push(running.child);
  return running;
}

function clientsFor(socket: string) {
  const target = `unix://${socket}`;
  const c = {
    identity: new ServiceClient(Identity, target),
    controller: new ServiceClient(Controller, target),
    metadata: new ServiceClient(SnapshotMetadata, target),
  };
  clients.push(c.identity, c.controller, c.metadata);
  return c;
}

function exited(child: ChildProcess): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  if (child.exitCode !== null || child.signalCode !== null) {
    return Promise.resolve({ code: child.exitCode, signal: child.signalCode });
  }
  return new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
}

/** Starts the CLI in any working directory (spawnDriver only works from the repository). */
function startCli(args: string[], cwd: string) {
  const child = spawn(process.execPath, ['--import', TSX_LOADER, path.join(REPO_ROOT, 'src/cli.ts'), ...args], {
    cwd,
    env: { ...process.env, CSI_ENDPOINT: undefined },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.push(child);
  const out = { stdout: '', stderr: '' };
  child.stdout!.on('data', (b: Buffer) => (out.stdout += b.toString()));
  child.stderr!.on('data', (b: Buffer) => (out.stderr += b.toString()));
  return { child, out };
}

/** Runs the CLI to completion (for flags it must refuse). */
async function runCli(args: string[], cwd: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const { child, out } = startCli(args, cwd);
  const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
  const { code } = await exited(child);
  clearTimeout(timer);
  return { code, ...out };
}

/** Polls until `check` returns a value (not undefined) or the time is up. */
async function eventually<T>(check: () => T | undefined, what: string, timeoutMs = 10_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = check();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Parsed JSON log lines of a process's stdout (every non-empty line must be JSON). */
function jsonLines(stdout: string): Record<string, unknown>[] {
  return stdout
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

/** Prepares a state directory holding one volume with `blocks` changed blocks between two FIXED snapshots. */
async function stateWithBigDelta(stateDir: string, blocks: number): Promise<{ base: string; target: string }> {
  const store = BlockStore.open(path.join(stateDir, 'store'));
  try {
    const vol = await store.createVolume({ capacityBytes: blocks * 4096, attributes: { metadataStyle: 'FIXED' } });
    const base = await store.createSnapshot({ volumeId: vol.id, attributes: { metadataStyle: 'FIXED' } });
    store.trim(vol.id, 0, blocks * 4096); // every block changes, without writing data
    const target = await store.createSnapshot({ volumeId: vol.id, attributes: { metadataStyle: 'FIXED' } });
    return { base: base.id, target: target.id };
  } finally {
    await store.close();
  }
}

// ------------------------------------------------------------------ tests

describe('cbt-csi serve', () => {
  test('prints "listening on unix://<socket>" for the endpoint it was given, and answers GetPluginInfo there', async () => {
    const dir = tempDir();
    const socket = path.join(dir, 'csi.sock');
    const { stderr } = await serve(['--endpoint', `unix://${socket}`, '--state-dir', path.join(dir, 'state')]);
    expect(stderr()).toContain(`listening on unix://${socket}`);
    expect(fs.statSync(socket).isSocket()).toBe(true);
    const info = await clientsFor(socket).identity.call('getPluginInfo', {});
    expect(info).toMatchObject({ name: 'cbt.csi.dev', vendorVersion: pkg.version });
  });

  test('under umask 000 the CSI socket is 0600, and the state and socket directories it creates are 0700', async () => {
    const dir = tempDir();
    const socket = path.join(dir, 'sockets', 'nested', 'csi.sock');
    const stateDir = path.join(dir, 'state', 'nested');
    fs.chmodSync(dir, 0o755);
    const { child } = await serve(['--endpoint', `unix://${socket}`, '--state-dir', stateDir], { umask: 0 });
    // The child really runs under umask 000 (a file it would create plainly is 0666).
    expect(fs.readFileSync(`/proc/${child.pid}/status`, 'utf8')).toMatch(/^Umask:\s+0000$/m);
    const mode = (p: string) => fs.statSync(p).mode & 0o777;
    expect(fs.statSync(socket).isSocket()).toBe(true);
    expect(mode(socket)).toBe(0o600);
    for (const d of [stateDir, path.dirname(stateDir), path.dirname(socket), path.dirname(path.dirname(socket))]) {
      expect(mode(d), d).toBe(0o700);
    }
    // A directory that existed before is not ours to change.
    expect(mode(dir)).toBe(0o755);
    expect((await clientsFor(socket).identity.call('probe', {})).ready).toBe(true);
  });

  test('under umask 022 the CSI socket is 0600 too (not 0755, which lets any local user connect)', async () => {
    const dir = tempDir();
    const socket = path.join(dir, 'csi.sock');
    await serve(['--endpoint', `unix://${socket}`, '--state-dir', path.join(dir, 'state')], { umask: 0o022 });
    expect(fs.statSync(socket).mode & 0o777).toBe(0o600);
    expect(fs.statSync(path.join(dir, 'state')).mode & 0o777).toBe(0o700);
  });

  test('the endpoint can come from CSI_ENDPOINT, as the CSI spec suggests', async () => {
    const dir = tempDir();
    const socket = path.join(dir, 'from-env.sock');
    const { stderr } = await serve(['--state-dir', path.join(dir, 'state')], {
      env: { CSI_ENDPOINT: `unix://${socket}` },
    });
    expect(stderr()).toContain(`listening on unix://${socket}`);
    expect((await clientsFor(socket).identity.call('probe', {})).ready).toBe(true);
  });

  test('with no flags (npm start) it keeps its state in ./.state of the working directory and prints that endpoint', async () => {
    const cwd = tempDir();
    const { out } = startCli(['serve'], cwd);
    const socket = path.join(cwd, '.state', 'csi.sock');
    await eventually(
      () => (out.stderr.includes('listening on') ? true : undefined),
      `the driver to start: ${out.stderr}`,
      30_000,
    );
    expect(out.stderr).toContain(`listening on unix://${socket}`);
    expect((await clientsFor(socket).identity.call('getPluginInfo', {})).name).toBe('cbt.csi.dev');
    expect(fs.existsSync(path.join(cwd, '.state', 'store'))).toBe(true);
  });

  test('SIGTERM during an in-flight stream: the stream still completes, then the process exits 0 and removes its socket', async () => {
    const dir = tempDir();
    const BLOCKS = 200_000;
    const { base, target } = await stateWithBigDelta(path.join(dir, 'state'), BLOCKS);
    const socket = path.join(dir, 'csi.sock');
    const { child } = await serve(['--endpoint', `unix://${socket}`, '--state-dir', path.join(dir, 'state')]);
    const { metadata } = clientsFor(socket);

    const call = metadata.stream('getMetadataDelta', {
      baseSnapshotId: base,
      targetSnapshotId: target,
      maxResults: 256,
    });
    let tuples = 0;
    let lastEnd = 0n;
    const ended = new Promise<number>((resolve) => {
      call.on('data', (m: { blockMetadata: { byteOffset: bigint; sizeBytes: bigint }[] }) => {
        tuples += m.blockMetadata.length;
        const last = m.blockMetadata[m.blockMetadata.length - 1];
        if (last) lastEnd = last.byteOffset + last.sizeBytes;
      });
      call.on('error', (err: { code: number }) => resolve(err.code));
      call.on('end', () => resolve(0));
    });
    await eventually(() => (tuples > 0 ? true : undefined), 'the first message');
    call.pause();
    const exit = exited(child);
    child.kill('SIGTERM');
    await new Promise((r) => setTimeout(r, 300));
    call.resume();

    expect(await ended).toBe(status.OK);
    expect(tuples).toBe(BLOCKS);
    expect(lastEnd).toBe(BigInt(BLOCKS * 4096));
    expect(await exit).toEqual({ code: 0, signal: null });
    expect(fs.existsSync(socket)).toBe(false);
  });

  test('SIGTERM while a client has stopped reading a stream: after --drain-timeout the call is reset (an error, never a clean end), and the process exits 0 and removes its socket', async () => {
    const dir = tempDir();
    const BLOCKS = 200_000;
    const { base, target } = await stateWithBigDelta(path.join(dir, 'state'), BLOCKS);
    const socket = path.join(dir, 'csi.sock');
    const { child } = await serve([
      '--endpoint',
      `unix://${socket}`,
      '--state-dir',
      path.join(dir, 'state'),
      '--drain-timeout',
      '1',
    ]);
    const { metadata } = clientsFor(socket);

    const call = metadata.stream('getMetadataDelta', {
      baseSnapshotId: base,
      targetSnapshotId: target,
      maxResults: 256,
    });
    let tuples = 0;
    const ended = new Promise<number>((resolve) => {
      call.on('error', (err: { code: number }) => resolve(err.code));
      call.on('end', () => resolve(0));
    });
    await new Promise<void>((resolve) =>
      call.once('data', (m: { blockMetadata: unknown[] }) => {
        tuples += m.blockMetadata.length;
        call.pause(); // and never read again until the server gives up
        resolve();
      }),
    );
    const started = Date.now();
    child.kill('SIGTERM');
    expect(await exited(child)).toEqual({ code: 0, signal: null });
    expect(Date.now() - started).toBeLessThan(10_000);
    expect(fs.existsSync(socket)).toBe(false);
    call.on('data', (m: { blockMetadata: unknown[] }) => (tuples += m.blockMetadata.length));
    call.resume();
    expect(await ended).not.toBe(status.OK);
    expect(tuples).toBeLessThan(BLOCKS);
  });

  test('SIGTERM with no calls in flight exits 0 promptly and removes the socket', async () => {
    const dir = tempDir();
    const socket = path.join(dir, 'csi.sock');
    const { child } = await serve(['--endpoint', `unix://${socket}`, '--state-dir', path.join(dir, 'state')]);
    await clientsFor(socket).identity.call('probe', {});
    const started = Date.now();
    child.kill('SIGTERM');
    expect(await exited(child)).toEqual({ code: 0, signal: null });
    expect(Date.now() - started).toBeLessThan(10_000);
    expect(fs.existsSync(socket)).toBe(false);
  });

  test('a stale socket file left by a SIGKILLed server is replaced on restart', async () => {
    const dir = tempDir();
    const socket = path.join(dir, 'csi.sock');
    const args = ['--endpoint', `unix://${socket}`, '--state-dir', path.join(dir, 'state')];
    const first = await serve(args);
    first.child.kill('SIGKILL');
    await exited(first.child);
    expect(fs.existsSync(socket)).toBe(true); // nobody cleaned up: this is the stale file

    const second = await serve(args);
    expect(second.stderr()).toContain(`listening on unix://${socket}`);
    expect((await clientsFor(socket).identity.call('getPluginInfo', {})).name).toBe('cbt.csi.dev');
  });

  test('a socket that a running server answers on is not taken over: the second server exits non-zero and says why', async () => {
    const dir = tempDir();
    const socket = path.join(dir, 'csi.sock');
    await serve(['--endpoint', `unix://${socket}`, '--state-dir', path.join(dir, 'state')]);
    const second = await runCli(
      ['serve', '--endpoint', `unix://${socket}`, '--state-dir', path.join(dir, 'state2')],
      dir,
    );
    expect(second.code).not.toBe(0);
    expect(second.stderr).toMatch(/in use/);
    expect((await clientsFor(socket).identity.call('probe', {})).ready).toBe(true);
  });

  test('an endpoint path holding a regular file is refused, and the file is left untouched', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'precious.txt');
    fs.writeFileSync(file, 'keep me');
    const result = await runCli(['serve', '--endpoint', `unix://${file}`, '--state-dir', path.join(dir, 'state')], dir);
    expect(result.code).not.toBe(0);
    expect(result.stderr).toMatch(/not a socket/);
    expect(fs.readFileSync(file, 'utf8')).toBe('keep me');
  });

  test('--metrics-address 127.0.0.1:0 binds a free port, prints the metrics URL, and serves cbt_csi_rpc_total by method and code', async () => {
    const dir = tempDir();
    const socket = path.join(dir, 'csi.sock');
    const { stderr } = await serve([
      '--endpoint',
      `unix://${socket}`,
      '--state-dir',
      path.join(dir, 'state'),
      '--metrics-address',
      '127.0.0.1:0',
    ]);
    const url = /metrics at (http:\/\/127\.0\.0\.1:(\d+)\/metrics)/.exec(stderr());
    expect(url, stderr()).not.toBeNull();
    expect(Number(url![2])).toBeGreaterThan(0);

    const { identity, metadata } = clientsFor(socket);
    await identity.call('getPluginInfo', {});
    await identity.call('getPluginInfo', {});
    expect(await codeOf(metadata.collect('getMetadataAllocated', { snapshotId: 'snap-0000000000000000' }))).toBe(
      status.NOT_FOUND,
    );

    const res = await fetch(url![1]!);
    expect(res.status).toBe(200);
    const body = await res.text();
    const sample = (method: string, code: string) =>
      body
        .split('\n')
        .find(
          (l) => l.startsWith('cbt_csi_rpc_total{') && l.includes(`method="${method}"`) && l.includes(`code="${code}"`),
        );
    expect(sample('GetPluginInfo', 'OK')).toMatch(/ 2$/);
    expect(sample('GetMetadataAllocated', 'NOT_FOUND')).toMatch(/ 1$/);
  });

  test('logs one JSON line per RPC on stdout, with method, code and ms', async () => {
    const dir = tempDir();
    const socket = path.join(dir, 'csi.sock');
    const { stdout } = await serve(['--endpoint', `unix://${socket}`, '--state-dir', path.join(dir, 'state')]);
    const { identity, metadata } = clientsFor(socket);
    await identity.call('getPluginInfo', {});
    await identity.call('probe', {});
    expect(await codeOf(metadata.collect('getMetadataDelta', { baseSnapshotId: '', targetSnapshotId: '' }))).toBe(
      status.INVALID_ARGUMENT,
    );
    const rpcLines = await eventually(() => {
      const lines = jsonLines(stdout()).filter((l) => l.msg === 'rpc');
      return lines.length >= 3 ? lines : undefined;
    }, 'three rpc log lines');
    await new Promise((r) => setTimeout(r, 200)); // nothing more should follow
    expect(jsonLines(stdout()).filter((l) => l.msg === 'rpc')).toHaveLength(3);
    expect(rpcLines.map((l) => [l.method, l.code])).toEqual([
      ['GetPluginInfo', 'OK'],
      ['Probe', 'OK'],
      ['GetMetadataDelta', 'INVALID_ARGUMENT'],
    ]);
    for (const l of rpcLines) {
      expect(typeof l.ms).toBe('number');
      expect(l.ms as number).toBeGreaterThanOrEqual(0);
    }
  });

  test('many concurrent calls are served without any warning on stderr', async () => {
    const dir = tempDir();
    const socket = path.join(dir, 'csi.sock');
    const { stderr } = await serve(['--endpoint', `unix://${socket}`, '--state-dir', path.join(dir, 'state')]);
    const { identity, metadata } = clientsFor(socket);
    const calls = Array.from({ length: 50 }, (_, i) =>
      i % 2
        ? identity.call('probe', {})
        : codeOf(metadata.collect('getMetadataAllocated', { snapshotId: 'snap-0000000000000000' })),
    );
    await Promise.all(calls);
    await new Promise((r) => setTimeout(r, 200));
    expect(stderr()).not.toMatch(/warning/i);
  });

  test('secret values are never written to stdout or stderr, even at --log-level debug', async () => {
    const dir = tempDir();
    const socket = path.join(dir, 'csi.sock');
    const { base, target } = await stateWithBigDelta(path.join(dir, 'state'), 10);
    const { stdout, stderr } = await serve([
      '--endpoint',
      `unix://${socket}`,
      '--state-dir',
      path.join(dir, 'state'),
      '--log-level',
      'debug',
    ]);
    const secrets = { password: 'hunter2' };
    const { metadata, controller } = clientsFor(socket);
    await metadata.collect('getMetadataAllocated', { snapshotId: target, secrets });
    await metadata.collect('getMetadataDelta', { baseSnapshotId: base, targetSnapshotId: target, secrets });
    await codeOf(metadata.collect('getMetadataAllocated', { snapshotId: 'snap-0000000000000000', secrets }));
    await codeOf(controller.call('deleteSnapshot', { snapshotId: 'snap-0000000000000000', secrets }));
    await codeOf(controller.call('listSnapshots', { secrets }));
    await eventually(() => {
      const n = jsonLines(stdout()).filter((l) => l.msg === 'rpc').length;
      return n >= 5 ? true : undefined;
    }, 'five rpc log lines');
    // The debug level really logged requests, so the absence below means redaction, not silence.
    expect(jsonLines(stdout()).some((l) => l.level === 'debug')).toBe(true);
    expect(stdout()).not.toContain('hunter2');
    expect(stderr()).not.toContain('hunter2');
  });
});

describe('cbt-csi serve refuses bad flags', () => {
  const cases: [string, string[], RegExp][] = [
    ['--default-block-size 3000 (not a power of two)', ['--default-block-size', '3000'], /power of two/],
    ['--default-block-size 2Mi (above 1 MiB)', ['--default-block-size', '2Mi'], /power of two/],
    ['--metadata-style X', ['--metadata-style', 'X'], /FIXED.*VARIABLE/],
    ['--endpoint http://x', ['--endpoint', 'http://x'], /unix:\/\/.*tcp:\/\//],
    ['--log-level loud', ['--log-level', 'loud'], /loud/],
    ['--default-max-results -1', ['--default-max-results', '-1'], /positive integer/],
    ['--metrics-address nope', ['--metrics-address', 'nope'], /metrics address/],
    ['--deleted-snapshot-retention -1', ['--deleted-snapshot-retention', '-1'], /number of days/],
    ['--deleted-snapshot-max 1.5', ['--deleted-snapshot-max', '1.5'], /whole number/],
  ];
  for (const [name, args, message] of cases) {
    test(`${name}: exits non-zero with a message naming the problem, and leaves no socket behind`, async () => {
      const dir = tempDir();
      const result = await runCli(['serve', '--state-dir', path.join(dir, 'state'), ...args], dir);
      expect(result.code, result.stderr).not.toBe(0);
      expect(result.stderr).toMatch(message);
      expect(fs.existsSync(path.join(dir, 'state', 'csi.sock'))).toBe(false);
    });
  }
});
