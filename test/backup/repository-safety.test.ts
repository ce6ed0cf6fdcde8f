/**
 * The repository and restore under a hostile or careless user: a repository is private whatever directory
 * it was made in; a backup killed while making it does not block the next; one writer at a time, also
 * across PID namespaces; the next backup's clean-up removes only what a backup leaves behind; a restore
 * never writes into the repository, never follows a path swapped for a symlink, and answers bad targets
 * with one line and exit code 2; verify finds a manifest naming bytes its chunk does not hold.
 */
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it, vi } from 'vitest';
import { CHUNK_SIZE, writeBackup } from '../../src/backup/backup-run.js';
import type { BlockSource } from '../../src/backup/block-target.js';
import { BackupRepository, RepositoryError } from '../../src/backup/repository.js';
import { createProgress } from '../../src/backup/progress.js';
import { restoreBackup } from '../../src/backup/restore.js';
import { REPO_ROOT, TSX_LOADER } from '../support/test-driver.js';
import { runCli, type CliResult } from './support/cli.js';
import { commitBackup, tempDirPerTest } from './support/repository.js';
import { looserThanPrivate } from './support/volumes.js';

const MiB = 2 ** 20;
const dir = tempDirPerTest('cbt-repo-safety-');
const quiet = createProgress('quiet');

/** A repository with one full backup of a 1 MiB volume whose first 64 KiB are `data`. */
async function oneBackup(data = randomBytes(64 * 1024)) {
  const repo = await BackupRepository.openOrCreate(path.join(dir(), 'repo'));
  const m = await commitBackup(repo, MiB, [[[0, data]]], null, MiB);
  return { repo, m, data };
}

/** Every file under `root`, with its bytes' SHA-256 hex prefix: equal trees, equal strings. */
function listing(root: string): string[] {
  return (fs.readdirSync(root, { recursive: true }) as string[]).sort().map((p) => {
    const st = fs.lstatSync(path.join(root, p));
    return st.isFile() ? `${p} ${fs.readFileSync(path.join(root, p)).toString('base64').slice(0, 16)}` : `${p}/`;
  });
}

function expectUsageLine(r: CliResult, pattern: RegExp): void {
  expect(r.code, `exit code 2; stderr: ${r.stderr}`).toBe(2);
  const lines = r.stderr.trim().split('\n');
  expect(lines, 'one line on stderr').toHaveLength(1);
  expect(lines[0]).toMatch(pattern);
}

/** Starts a process holding `repo`'s writer lock (in a new PID namespace with `unshare`); resolves once it answered. */
function holdLock(repo: string, unshare: boolean) {
  const node = [
    process.execPath,
    '--import',
    TSX_LOADER,
    path.join(REPO_ROOT, 'test/backup/support/hold-lock.ts'),
    repo,
  ];
  const [cmd, ...args] = unshare ? ['unshare', '--pid', '--fork', '--kill-child', ...node] : node;
  const child = spawn(cmd!, args, { stdio: ['pipe', 'pipe', 'inherit'] });
  const answer = new Promise<string>((resolve) => {
    let out = '';
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes('\n')) resolve(out.trim());
    });
    child.once('exit', () => resolve(out.trim()));
  });
  const stop = async () => {
    if (child.exitCode !== null) return;
    const exited = new Promise((r) => child.once('exit', r));
    child.stdin!.end();
    await exited;
  };
  return { answer, stop };
}

/** Why a new PID namespace cannot be made here, or undefined if it can. */
function missingUnshare(): string | undefined {
  if (process.getuid?.() !== 0) return 'a PID namespace needs root';
  const r = spawnSync('unshare', ['--pid', '--fork', 'true']);
  return r.status === 0 ? undefined : `unshare --pid failed: ${r.stderr?.toString().trim() || r.error?.message}`;
}
const unshareMissing = missingUnshare();

describe('repository safety', () => {
  it('a repository made in an existing empty directory is 0700, whatever that directory allowed', async () => {
    const repoDir = path.join(dir(), 'given');
    fs.mkdirSync(repoDir);
    fs.chmodSync(repoDir, 0o777);
    const repo = await BackupRepository.openOrCreate(repoDir);
    await commitBackup(repo, MiB, [[[0, randomBytes(4096)]]], null, MiB);
    expect(fs.statSync(repoDir).mode & 0o777).toBe(0o700);
    expect(looserThanPrivate(repoDir)).toEqual([]);
  });

  it('a backup killed while it made the repository (directories made, no marker yet) does not block the next', async () => {
    const repoDir = path.join(dir(), 'half-made');
    for (const sub of ['chunks', 'backups', 'tmp']) fs.mkdirSync(path.join(repoDir, sub), { recursive: true });
    fs.writeFileSync(path.join(repoDir, `.cbt-backup-repository.json.4242.0badc0de.tmp`), '{"form');
    expect(await BackupRepository.check(repoDir)).toBe('empty');
    const repo = await BackupRepository.openOrCreate(repoDir);
    const m = await commitBackup(repo, MiB, [[[0, randomBytes(4096)]]], null, MiB);
    expect(await repo.backupIds()).toEqual([m.id]);
    expect(fs.readdirSync(repoDir).sort()).toEqual([
      '.cbt-backup-repository.json.4242.0badc0de.tmp',
      'backups',
      'cbt-backup-repository.json',
      'chunks',
      'lock',
      'tmp',
    ]);
    // A directory holding anything else is still not ours to take.
    const other = path.join(dir(), 'other');
    fs.mkdirSync(path.join(other, 'chunks'), { recursive: true });
    fs.writeFileSync(path.join(other, 'chunks', 'notes.txt'), 'mine');
    await expect(BackupRepository.check(other)).rejects.toThrow(/not a backup repository .* not empty/);
  });

  it('one writer at a time: a second lock is refused while the first is held, in this process or another', async () => {
    const { repo } = await oneBackup();
    const results = await Promise.allSettled([repo.lock(), repo.lock()]);
    expect(results.map((r) => r.status).sort()).toEqual(['fulfilled', 'rejected']);
    const refused = results.find((r) => r.status === 'rejected') as PromiseRejectedResult;
    expect(refused.reason).toBeInstanceOf(RepositoryError);
    expect((refused.reason as RepositoryError).kind).toBe('busy');
    for (const r of results) if (r.status === 'fulfilled') await r.value.release();

    const holder = holdLock(repo.dir, false);
    try {
      expect(await holder.answer).toBe('locked');
      await expect(repo.lock()).rejects.toMatchObject({ kind: 'busy' });
    } finally {
      await holder.stop();
    }
    // Released (or its holder gone): the next writer takes it.
    const lock = await repo.lock();
    await lock.release();
  });

  (unshareMissing === undefined || process.env.CI === 'true' ? it : it.skip)(
    `two backups in their own PID namespaces (both PID 1, as two backup Jobs) do not both take the lock${unshareMissing ? ` — skipped: ${unshareMissing}` : ''}`,
    async () => {
      if (unshareMissing) throw new Error(`CI=true: ${unshareMissing}`);
      const { repo } = await oneBackup();
      const first = holdLock(repo.dir, true);
      try {
        expect(await first.answer).toBe('locked');
        const second = holdLock(repo.dir, true);
        try {
          expect(await second.answer).toMatch(/^busy: another backup .* is writing to/);
        } finally {
          await second.stop();
        }
      } finally {
        await first.stop();
      }
    },
  );

  it('clean-up removes only what a backup leaves: not a stray file in chunks/, not what a symlinked tmp/ points at', async () => {
    const { repo } = await oneBackup();
    const outside = path.join(dir(), 'outside');
    fs.mkdirSync(outside);
    fs.writeFileSync(path.join(outside, 'precious'), 'keep me');
    fs.rmSync(path.join(repo.dir, 'tmp'), { recursive: true });
    fs.symlinkSync(outside, path.join(repo.dir, 'tmp'));
    fs.mkdirSync(path.join(repo.dir, 'chunks', 'ab'), { recursive: true });
    fs.writeFileSync(path.join(repo.dir, 'chunks', 'ab', 'notes.txt'), 'mine');
    // What a killed backup leaves, which does go.
    const orphan = `ab${'0'.repeat(62)}`;
    fs.writeFileSync(path.join(repo.dir, 'chunks', 'ab', orphan), 'unnamed chunk');
    fs.writeFileSync(path.join(outside, `.${orphan}.4242.0badc0de.tmp`), 'temp of a killed backup');

    const lock = await repo.lock();
    await lock.release();
    expect(fs.readdirSync(outside)).toEqual(['precious']);
    expect(fs.readdirSync(path.join(repo.dir, 'chunks', 'ab'))).toEqual(['notes.txt']);
  });

  it('a temp directory left in tmp/ does not make every later backup fail', async () => {
    const { repo } = await oneBackup();
    fs.mkdirSync(path.join(repo.dir, 'tmp', 'stray'));
    const lock = await repo.lock();
    await lock.release();
  });

  it('restore refuses a target inside the repository: nothing is written there', async () => {
    const { repo, m } = await oneBackup();
    const before = listing(repo.dir);
    for (const target of [path.join(repo.dir, 'restored.img'), path.join(repo.dir, 'chunks', 'x.img')]) {
      const err = await restoreBackup(repo, m.id, target, quiet).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(RepositoryError);
      expect((err as RepositoryError).kind).toBe('usage');
      expect((err as Error).message).toMatch(/is inside the repository/);
    }
    // A chunk file of another backup's size is no target either: it would be overwritten.
    const big = await commitBackup(repo, 64 * 1024, [[[0, randomBytes(64 * 1024)]]], null, MiB);
    const chunk = repo.chunkPath(big.extents[0]![2]);
    const other = await commitBackup(repo, 64 * 1024, [[[0, randomBytes(4096)]]], null, MiB);
    const withChunks = listing(repo.dir);
    await expect(restoreBackup(repo, other.id, chunk, quiet)).rejects.toThrow(/is inside the repository/);
    expect(listing(repo.dir)).toEqual(withChunks);
    expect(before.length).toBeLessThan(withChunks.length);
  });

  it('an image restore makes is 0600 whatever the umask (0377 made it read-only 0400)', async () => {
    const { repo, m } = await oneBackup();
    const old = process.umask(0o377);
    try {
      await restoreBackup(repo, m.id, path.join(dir(), 'out.img'), quiet);
    } finally {
      process.umask(old);
    }
    expect(fs.statSync(path.join(dir(), 'out.img')).mode & 0o777).toBe(0o600);
  });

  it('restore onto a path swapped for a symlink after it was checked writes nothing through the symlink', async () => {
    const { repo, m } = await oneBackup();
    const target = path.join(dir(), 'target.img');
    const victim = path.join(dir(), 'victim.img');
    fs.writeFileSync(target, Buffer.alloc(MiB, 1));
    fs.writeFileSync(victim, Buffer.alloc(MiB, 2));
    const lstat = fs.promises.lstat;
    const spy = vi.spyOn(fs.promises, 'lstat').mockImplementation(async (p, ...rest) => {
      const st = await lstat(p, ...(rest as []));
      // The swap lands between the check and the open.
      if (p === target) {
        fs.rmSync(target);
        fs.symlinkSync(victim, target);
      }
      return st;
    });
    try {
      const err = await restoreBackup(repo, m.id, target, quiet).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(RepositoryError);
      expect((err as RepositoryError).kind).toBe('usage');
    } finally {
      spy.mockRestore();
    }
    expect(fs.readFileSync(victim).equals(Buffer.alloc(MiB, 2)), 'the symlinked file is untouched').toBe(true);
  });

  it('verify reports a manifest whose extent reads past the end of its chunk (restore refuses it)', async () => {
    const { repo, m } = await oneBackup(randomBytes(8192));
    const file = path.join(repo.dir, 'backups', `${m.id}.json`);
    const edited = JSON.parse(fs.readFileSync(file, 'utf8')) as { extents: [number, number, string, number][] };
    edited.extents[0]![1] = 16384;
    fs.writeFileSync(file, JSON.stringify(edited));
    await expect(restoreBackup(repo, m.id, path.join(dir(), 'out.img'), quiet)).rejects.toThrow(/has 8192 bytes/);
    const report = await repo.verify();
    expect(report.damagedManifests).toEqual([
      { id: m.id, problem: expect.stringMatching(/extent at 0 .*past the end of chunk .* \(8192 bytes\)/) },
    ]);
  });
});

describe('a damaged repository is said to be damaged', () => {
  it('verify of a repository whose backups/ directory is gone fails (it said "ok: 0 backups")', async () => {
    const { repo } = await oneBackup();
    fs.rmSync(path.join(repo.dir, 'backups'), { recursive: true });
    const r = await runCli(['verify', '--repo', repo.dir, '--quiet']);
    expect(r.code, r.stdout).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/repository .* is damaged: its backups\/ directory is missing/);
  });

  it('a truncated or hand-edited marker is named in one line, exit code 1', async () => {
    const { repo } = await oneBackup();
    for (const text of ['', 'null', '{"format": "cbt-csi-backup-repos']) {
      fs.writeFileSync(path.join(repo.dir, 'cbt-backup-repository.json'), text);
      const r = await runCli(['verify', '--repo', repo.dir, '--quiet']);
      expect(r.code, r.stderr).toBe(1);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(/cbt-backup-repository\.json is damaged/);
    }
  });
});

describe('verify --backup', () => {
  it("judges only that backup's chain: another backup's broken chain does not fail it, and a broken chain names the missing base", async () => {
    const { repo, m: full } = await oneBackup();
    const inc = await commitBackup(repo, MiB, [[[8192, randomBytes(4096)]]], full, MiB);
    const other = await commitBackup(repo, MiB, [[[0, randomBytes(4096)]]], null, MiB);
    fs.rmSync(path.join(repo.dir, 'backups', `${full.id}.json`));
    const mine = await repo.verify([other.id]);
    expect(mine.damagedManifests).toEqual([]);
    expect(mine.damaged).toEqual([]);
    const broken = await repo.verify([inc.id]);
    expect(broken.damagedManifests).toEqual([
      { id: inc.id, problem: `backup ${inc.id}: its base ${full.id} is missing or damaged` },
    ]);
    // The whole repository: the broken one is reported, the sound one is not.
    expect((await repo.verify()).damagedManifests.map((d) => d.id)).toEqual([inc.id]);
  });
});

describe('a backup that fails', () => {
  it('takes away the chunks it stored: a full disk is not left full of chunks no backup names', async () => {
    const { repo, m } = await oneBackup();
    const chunkFiles = () =>
      fs.readdirSync(path.join(repo.dir, 'chunks')).flatMap((d) => fs.readdirSync(path.join(repo.dir, 'chunks', d)));
    const before = chunkFiles();
    // A source that fails (as a disk that goes away) once most of the backup is stored.
    const capacity = 8 * CHUNK_SIZE;
    let reads = 0;
    const source: BlockSource = {
      path: 'failing',
      size: capacity,
      direct: false,
      read: async (_offset, length) => randomBytes(length),
      readInto: async (into) => {
        if (++reads > 24) throw new Error('EIO: the source went away');
        randomBytes(into.length).copy(into);
      },
      close: async () => undefined,
    };
    const lock = await repo.lock();
    try {
      const plan = {
        snapshot: 'snap-x',
        sourceVolume: 'vol-1',
        base: null,
        capacityBytes: capacity,
        runs: [{ offset: 0, length: capacity }],
        bytes: capacity,
        resumes: 0,
      };
      await expect(writeBackup(repo, lock, plan, source, quiet)).rejects.toThrow(/the source went away/);
    } finally {
      await lock.release();
    }
    expect(await repo.backupIds()).toEqual([m.id]);
    expect(chunkFiles().sort()).toEqual(before.sort());
    expect(fs.readdirSync(repo.tmpDir)).toEqual([]);
    expect((await repo.verify()).damaged).toEqual([]);
  });
});

describe('restore and blockmap: bad output paths are exit code 2, one line, nothing written', () => {
  it('a restore target whose directory does not exist, or a read-only place', async () => {
    const { repo, m } = await oneBackup();
    expectUsageLine(
      await runCli(['restore', '--repo', repo.dir, '--backup', m.id, '--target', path.join(dir(), 'no', 'x.img')]),
      /^cbt-csi restore: target .*x\.img cannot be created: .*(no such file or directory|does not exist)/i,
    );
    expectUsageLine(
      await runCli(['restore', '--repo', repo.dir, '--backup', m.id, '--target', '/proc/cbt-restore.img']),
      /^cbt-csi restore: target \/proc\/cbt-restore\.img cannot be created/,
    );
  });

  it('a block map --out that is a directory or in a missing one', async () => {
    const { repo } = await oneBackup();
    expectUsageLine(
      await runCli(['blockmap', '--repo', repo.dir, '--out', dir()]),
      /^cbt-csi blockmap: cannot write the block map to .*: /,
    );
    expectUsageLine(
      await runCli(['blockmap', '--repo', repo.dir, '--out', path.join(dir(), 'no', 'map.svg')]),
      /^cbt-csi blockmap: cannot write the block map to .*map\.svg: /,
    );
  });
});

describe('a malformed --endpoint is bad input: exit code 2, one line, nothing written', () => {
  it('metadata and backup with an endpoint of another scheme, or an empty socket path', async () => {
    expectUsageLine(
      await runCli(['metadata', 'allocated', 'snap-1', '--endpoint', 'http://localhost:1']),
      /^cbt-csi metadata allocated: endpoint http:\/\/localhost:1: expected unix:\/\/\/path\/csi\.sock or tcp:\/\/HOST:PORT$/,
    );
    const repo = path.join(dir(), 'repo');
    expectUsageLine(
      await runCli([
        'backup',
        '--repo',
        repo,
        '--snapshot',
        'snap-1',
        '--source',
        '/dev/null',
        '--endpoint',
        'unix://',
      ]),
      /^cbt-csi backup: endpoint unix:\/\/: the socket path is empty$/,
    );
    expect(fs.existsSync(repo)).toBe(false);
  });
});

describe('numeric flags', () => {
  it('an empty --starting-offset or --max-results (an unset shell variable) is bad input, not 0', async () => {
    for (const flag of ['--starting-offset', '--max-results']) {
      const r = await runCli(['metadata', 'allocated', 'snap-1', flag, '', '--endpoint', 'unix:///nonexistent.sock']);
      expect(r.code, r.stderr).toBe(2);
      expect(r.stderr).toMatch(/expected an integer, 0 or more/);
    }
  });
});

describe('no driver at the endpoint', () => {
  it('backup says no driver answers there (exit code 2), not "[internal] connect ENOENT"', async () => {
    const repo = path.join(dir(), 'repo');
    const r = await runCli([
      'backup',
      '--repo',
      repo,
      '--snapshot',
      'snap-1',
      '--source',
      '/dev/null',
      '--endpoint',
      `unix://${path.join(dir(), 'none.sock')}`,
    ]);
    expectUsageLine(r, /^cbt-csi backup: no driver answers at unix:\/\/.*none\.sock: connect ENOENT/);
    expect(fs.existsSync(repo)).toBe(false);
  });
});

describe('blockmap --out', () => {
  it('a symlink at the --out path (planted in a shared directory) is replaced, not written through', async () => {
    const { repo } = await oneBackup();
    const victim = path.join(dir(), 'victim');
    fs.writeFileSync(victim, 'precious');
    const out = path.join(dir(), 'map.svg');
    fs.symlinkSync(victim, out);
    const r = await runCli(['blockmap', '--repo', repo.dir, '--out', out]);
    expect(r.code, r.stderr).toBe(0);
    expect(fs.readFileSync(victim, 'utf8')).toBe('precious');
    expect(fs.lstatSync(out).isFile()).toBe(true);
    expect(fs.readFileSync(out, 'utf8')).toMatch(/^<\?xml|^<svg/);
  });
});

describe('Kubernetes mode, bad kubeconfig', () => {
  it('a kubeconfig that is not YAML is one line, exit code 2 (the parser drew a code frame over several)', async () => {
    const kubeconfig = path.join(dir(), 'bad.kubeconfig');
    fs.writeFileSync(kubeconfig, 'clusters: [\n');
    const r = await runCli(['metadata', 'allocated', 'snap', '--namespace', 'ns', '--kubeconfig', kubeconfig]);
    expectUsageLine(r, /bad\.kubeconfig cannot be loaded: /);
  });
});

describe('--block-size', () => {
  it('3 × 2^32 is no power of two (32-bit bitwise arithmetic let it through)', async () => {
    const r = await runCli(['metadata', 'allocated', 'snap-1', '--block-size', String(3 * 2 ** 32)]);
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toMatch(/expected a power of two/);
  });
});
