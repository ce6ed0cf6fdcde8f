/**
 * Bad input to the backup commands: one clear line on stderr, exit code 2, and nothing written to the
 * repository (or to the target). Runs the real `cbt-csi` commands against a driver process; the snapshot's
 * bytes come from --source image files, so no root is needed.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { ChildProcess } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Controller } from '../../src/gen/csi/v1/csi_pb.js';
import { ServiceClient } from '../support/csi-client.js';
import { spawnDriver } from '../support/test-driver.js';
import { MiB, blockCap } from '../e2e/support/node-env.js';
import { jsonOf, runCli, startCli, type CliResult } from './support/cli.js';

let dir: string;
let child: ChildProcess;
let controller: ServiceClient<typeof Controller>;
let endpoint: string;
let snapA: string;
let snapB: string;
let repo: string;
let baseOfA: string;
const CAPACITY = 8 * MiB;

/** Every file under `root` with its mode and a hash of its content: equal trees, equal strings. */
function tree(root: string): string {
  if (!fs.existsSync(root)) return '(absent)';
  const out: string[] = [];
  const walk = (d: string) => {
    for (const name of fs.readdirSync(d).sort()) {
      const p = path.join(d, name);
      const st = fs.statSync(p);
      if (st.isDirectory()) {
        out.push(`${path.relative(root, p)}/ ${(st.mode & 0o777).toString(8)}`);
        walk(p);
      } else
        out.push(
          `${path.relative(root, p)} ${(st.mode & 0o777).toString(8)} ${createHash('sha256').update(fs.readFileSync(p)).digest('hex')}`,
        );
    }
  };
  walk(root);
  return out.join('\n');
}

function expectUsageError(r: CliResult, pattern: RegExp): void {
  expect(r.code, `exit code 2; stderr: ${r.stderr}`).toBe(2);
  const lines = r.stderr.trim().split('\n');
  expect(lines, 'one line on stderr').toHaveLength(1);
  expect(lines[0]).toMatch(pattern);
}

const cli = (...args: string[]) =>
  runCli([...args, ...(['backup', 'metadata', 'blockmap'].includes(args[0]!) ? ['--endpoint', endpoint] : [])]);

describe('backup commands: bad input is exit code 2, one line, nothing written', () => {
  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-bad-input-'));
    endpoint = `unix://${path.join(dir, 'csi.sock')}`;
    ({ child } = await spawnDriver([
      '--endpoint',
      endpoint,
      '--state-dir',
      path.join(dir, 'state'),
      '--role',
      'controller',
      '--log-level',
      'warn',
    ]));
    controller = new ServiceClient(Controller, endpoint);
    const make = async (name: string) => {
      const v = (
        await controller.call('createVolume', {
          name,
          capacityRange: { requiredBytes: BigInt(CAPACITY) },
          volumeCapabilities: [blockCap()],
        })
      ).volume!;
      return (await controller.call('createSnapshot', { sourceVolumeId: v.volumeId, name: `${name}-1` })).snapshot!
        .snapshotId;
    };
    snapA = await make('a');
    snapB = await make('b');
    // Nothing was written to these volumes, so an image of zeros holds each snapshot's bytes.
    fs.writeFileSync(path.join(dir, 'a.img'), Buffer.alloc(CAPACITY));
    fs.writeFileSync(path.join(dir, 'b.img'), Buffer.alloc(CAPACITY));
    fs.writeFileSync(path.join(dir, 'small.img'), Buffer.alloc(MiB, 7));
    repo = path.join(dir, 'repo');
    const full = await cli(
      'backup',
      '--repo',
      repo,
      '--snapshot',
      snapA,
      '--source',
      path.join(dir, 'a.img'),
      '--json',
      '--quiet',
    );
    expect(full.code, full.stderr).toBe(0);
    baseOfA = jsonOf<{ id: string }>(full).id;
  }, 120_000);

  afterAll(async () => {
    controller?.close();
    if (child && child.exitCode === null) {
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
    }
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('the round trip these cases are measured against works: backup, verify, restore of the zero volume', async () => {
    const verify = await cli('verify', '--repo', repo, '--json', '--quiet');
    expect(verify.code, verify.stderr).toBe(0);
    expect(jsonOf<{ ok: boolean }>(verify).ok).toBe(true);
    const target = path.join(dir, 'restored.img');
    const restore = await cli('restore', '--repo', repo, '--backup', baseOfA, '--target', target, '--quiet');
    expect(restore.code, restore.stderr).toBe(0);
    expect(fs.readFileSync(target).equals(Buffer.alloc(CAPACITY))).toBe(true);
    expect(fs.statSync(target).mode & 0o777).toBe(0o600);
  });

  it('an unknown snapshot', async () => {
    const fresh = path.join(dir, 'never-made');
    expectUsageError(
      await cli('backup', '--repo', fresh, '--snapshot', 'snap-00000000deadbeef', '--source', path.join(dir, 'a.img')),
      /snapshot snap-00000000deadbeef does not exist/,
    );
    expect(fs.existsSync(fresh), 'no repository was created').toBe(false);
    const before = tree(repo);
    expectUsageError(
      await cli('backup', '--repo', repo, '--snapshot', 'snap-00000000deadbeef', '--source', path.join(dir, 'a.img')),
      /does not exist/,
    );
    expect(tree(repo)).toBe(before);
  });

  it('a base backup of another volume', async () => {
    const before = tree(repo);
    expectUsageError(
      await cli('backup', '--repo', repo, '--snapshot', snapB, '--base', baseOfA, '--source', path.join(dir, 'b.img')),
      /base backup .* is of volume .* but snapshot .* is of volume .*same volume/,
    );
    expect(tree(repo)).toBe(before);
  });

  it('a directory that is not a repository (backup, restore, verify)', async () => {
    const other = path.join(dir, 'not-a-repo');
    fs.mkdirSync(other);
    fs.writeFileSync(path.join(other, 'notes.txt'), 'mine');
    const before = tree(other);
    expectUsageError(
      await cli('backup', '--repo', other, '--snapshot', snapA, '--source', path.join(dir, 'a.img')),
      /is not a backup repository/,
    );
    expectUsageError(
      await cli('restore', '--repo', other, '--backup', baseOfA, '--target', path.join(dir, 'x.img')),
      /is not a backup repository/,
    );
    expectUsageError(await cli('verify', '--repo', other), /is not a backup repository/);
    expect(tree(other)).toBe(before);
    expect(fs.existsSync(path.join(dir, 'x.img'))).toBe(false);
  });

  it('a restore target smaller than the volume', async () => {
    const small = path.join(dir, 'small.img');
    const before = tree(`${dir}/repo`) + fs.readFileSync(small).toString('hex').slice(0, 64);
    expectUsageError(
      await cli('restore', '--repo', repo, '--backup', baseOfA, '--target', small),
      /has 1048576 bytes, smaller than the backed-up volume's 8388608/,
    );
    expect(fs.readFileSync(small).equals(Buffer.alloc(MiB, 7)), 'the target is untouched').toBe(true);
    expect(tree(`${dir}/repo`) + fs.readFileSync(small).toString('hex').slice(0, 64)).toBe(before);
  });

  it('a source smaller than the snapshot', async () => {
    const fresh = path.join(dir, 'fresh-repo');
    expectUsageError(
      await cli('backup', '--repo', fresh, '--snapshot', snapA, '--source', path.join(dir, 'small.img')),
      /has 1048576 bytes but the snapshot has 8388608/,
    );
    expect(fs.existsSync(fresh)).toBe(false);
    const before = tree(repo);
    expectUsageError(
      await cli(
        'backup',
        '--repo',
        repo,
        '--snapshot',
        snapA,
        '--base',
        baseOfA,
        '--source',
        path.join(dir, 'small.img'),
      ),
      /has 1048576 bytes/,
    );
    expect(tree(repo)).toBe(before);
  });

  it('an unknown backup ID, and a missing required option', async () => {
    expectUsageError(
      await cli(
        'restore',
        '--repo',
        repo,
        '--backup',
        '20990101T000000.000Z-00000000',
        '--target',
        path.join(dir, 'y.img'),
      ),
      /is not in the repository/,
    );
    expectUsageError(
      await cli('restore', '--repo', repo, '--backup', 'latest', '--target', path.join(dir, 'y.img')),
      /is not a backup ID/,
    );
    const missing = await cli('backup', '--repo', repo);
    expect(missing.code).toBe(2);
    expect(missing.stderr).toMatch(/--snapshot/);
  });

  it('a base backup whose own chain is broken (its full backup gone): refused before anything is written', async () => {
    const v = (
      await controller.call('createVolume', {
        name: 'chain',
        capacityRange: { requiredBytes: BigInt(CAPACITY) },
        volumeCapabilities: [blockCap()],
      })
    ).volume!;
    const snaps: string[] = [];
    for (const n of [1, 2, 3])
      snaps.push(
        (await controller.call('createSnapshot', { sourceVolumeId: v.volumeId, name: `chain-${n}` })).snapshot!
          .snapshotId,
      );
    const chainRepo = path.join(dir, 'chain-repo');
    const image = path.join(dir, 'a.img');
    const take = async (snap: string, base?: string) => {
      const r = await cli(
        'backup',
        '--repo',
        chainRepo,
        '--snapshot',
        snap,
        '--source',
        image,
        '--json',
        '--quiet',
        ...(base ? ['--base', base] : []),
      );
      expect(r.code, r.stderr).toBe(0);
      return jsonOf<{ id: string }>(r).id;
    };
    const full = await take(snaps[0]!);
    const inc = await take(snaps[1]!, full);
    const manifest = path.join(chainRepo, 'backups', `${full}.json`);
    fs.renameSync(manifest, path.join(dir, 'hidden.json'));
    const before = tree(chainRepo);
    const r = await cli('backup', '--repo', chainRepo, '--snapshot', snaps[2]!, '--source', image, '--base', inc);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(new RegExp(`cannot build on backup ${inc}: .*needs base ${full}.*take a full backup`));
    expect(tree(chainRepo)).toBe(before);
  });

  it("a repository or restore target inside the driver's state directory", async () => {
    const state = path.join(dir, 'state');
    const layers = path.join(state, 'store', 'layers');
    expectUsageError(
      await cli('backup', '--repo', path.join(state, 'repo'), '--snapshot', snapA, '--source', path.join(dir, 'a.img')),
      /inside the cbt-csi driver's state directory/,
    );
    expectUsageError(
      await cli('restore', '--repo', repo, '--backup', baseOfA, '--target', path.join(layers, '999.layer')),
      /inside the cbt-csi driver's state directory/,
    );
    expectUsageError(
      await cli('restore', '--repo', repo, '--backup', baseOfA, '--target', path.join(state, 'restored.img')),
      /inside the cbt-csi driver's state directory/,
    );
    // Through a symlink to it as well.
    fs.symlinkSync(layers, path.join(dir, 'layers-link'));
    expectUsageError(
      await cli('restore', '--repo', repo, '--backup', baseOfA, '--target', path.join(dir, 'layers-link', 'x.layer')),
      /inside the cbt-csi driver's state directory/,
    );
    for (const made of [path.join(state, 'repo'), path.join(layers, '999.layer'), path.join(layers, 'x.layer')])
      expect(fs.existsSync(made), made).toBe(false);
    expect(fs.existsSync(path.join(state, 'restored.img'))).toBe(false);
  });

  it('a --source that is a FIFO is refused at once, not waited on for a writer (which no signal but SIGKILL ended)', async () => {
    const fifo = path.join(dir, 'source.fifo');
    execFileSync('mkfifo', [fifo]);
    const before = tree(repo);
    const run = startCli(['backup', '--repo', repo, '--snapshot', snapA, '--source', fifo, '--endpoint', endpoint]);
    const result = await Promise.race([run.done, sleep(30_000).then(() => undefined)]);
    if (!result) {
      run.child.kill('SIGKILL');
      expect.fail('backup hung opening the FIFO');
    }
    expectUsageError(result, /source\.fifo is neither a regular file nor a block device/);
    expect(tree(repo)).toBe(before);
  });

  it('a --repo under a dangling symlink (an unmounted disk), under /proc, or under a file: refused at once, exit code 2', async () => {
    fs.symlinkSync(path.join(dir, 'unmounted-disk'), path.join(dir, 'dangling'));
    fs.writeFileSync(path.join(dir, 'plain-file'), 'x');
    for (const [where, pattern] of [
      [path.join(dir, 'dangling', 'repo'), /repository .*dangling\/repo cannot be made: /],
      ['/proc/cbt-no-repo', /repository \/proc\/cbt-no-repo cannot be made: /],
      [path.join(dir, 'plain-file', 'repo'), /plain-file\/repo cannot be a backup repository: a file is on its path/],
    ] as const) {
      const run = startCli([
        'backup',
        '--repo',
        where,
        '--snapshot',
        snapA,
        '--source',
        path.join(dir, 'a.img'),
        '--endpoint',
        endpoint,
        '--quiet',
      ]);
      // Node's recursive mkdir spun here forever, at 100% CPU (ENOENT, then EEXIST for the parent, again).
      const result = await Promise.race([run.done, sleep(30_000).then(() => undefined)]);
      if (!result) {
        run.child.kill('SIGKILL');
        expect.fail(`backup --repo ${where} hung`);
      }
      expectUsageError(result, pattern);
    }
    expect(fs.existsSync(path.join(dir, 'unmounted-disk'))).toBe(false);
  });
});
