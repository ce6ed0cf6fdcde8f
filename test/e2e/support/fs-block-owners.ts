/**
 * Which filesystem structure holds a block of an unmounted ext4 or xfs image, asked of the filesystems' own
 * tools (dumpe2fs and debugfs from e2fsprogs, xfs_db from xfsprogs), so a test can say what the blocks of a
 * delta are: file data (and of which file), directories, the journal, or the filesystem's own metadata.
 *
 * Blocks are given in the driver's block size (the unit of its changed block tracking); a driver block that
 * spans several filesystem blocks (ext4 uses 1 KiB blocks on small volumes) gets the owner of each of them.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

/** What a filesystem block is for. */
export type BlockRole = 'file data' | 'directory' | 'journal' | 'metadata' | 'free';

export interface BlockOwner {
  role: BlockRole;
  /** The structure (e.g. "inode table", "btbno", "superblock") or, for files and directories, the path. */
  what: string;
}

/** One filesystem block inside a driver block, and what holds it. */
export interface FsBlockOwner extends BlockOwner {
  /** Filesystem block number (in fsBlockSize units from the start of the device). */
  fsBlock: number;
}

export interface BlockOwners {
  fsBlockSize: number;
  /** Per driver block asked, the filesystem blocks it covers, in order. */
  owners: Map<number, FsBlockOwner[]>;
}

function run(command: string, args: string[], env: NodeJS.ProcessEnv = process.env): string {
  const r = spawnSync(command, args, { encoding: 'utf8', env, maxBuffer: 256 * 2 ** 20 });
  if (r.status !== 0) {
    const why = r.error?.message ?? `exit ${String(r.status)}: ${r.stderr}${r.stdout.slice(-2000)}`;
    throw new Error(`${command} ${args.slice(0, 4).join(' ')}…: ${why}`);
  }
  return r.stdout;
}

/**
 * Owners of each driver block, one entry per filesystem block it covers. The image must be clean (its
 * journal replayed, e.g. mounted and unmounted once): xfs_db refuses an image whose log needs replay.
 */
export function blockOwners(
  device: string,
  fsType: 'ext4' | 'xfs',
  driverBlocks: readonly number[],
  driverBlockSize: number,
): BlockOwners {
  return fsType === 'ext4'
    ? ext4Owners(device, driverBlocks, driverBlockSize)
    : xfsOwners(device, driverBlocks, driverBlockSize);
}

/** The filesystem blocks (in `fsBlockSize` units) one driver block covers. */
function fsBlocksOf(driverBlock: number, driverBlockSize: number, fsBlockSize: number): number[] {
  const first = Math.floor((driverBlock * driverBlockSize) / fsBlockSize);
  const last = Math.floor(((driverBlock + 1) * driverBlockSize - 1) / fsBlockSize);
  const out: number[] = [];
  for (let b = first; b <= last; b++) out.push(b);
  return out;
}

function* ranges(text: string, re: RegExp): Generator<[number, number]> {
  for (const m of text.matchAll(re)) {
    const first = Number(m[1]);
    yield [first, m[2] ? Number(m[2]) : first];
  }
}

function ext4Owners(device: string, driverBlocks: readonly number[], driverBlockSize: number): BlockOwners {
  const dump = run('dumpe2fs', [device]);
  const fsBlockSize = Number(/^Block size:\s+(\d+)/m.exec(dump)?.[1]);
  const journalInode = Number(/^Journal inode:\s+(\d+)/m.exec(dump)?.[1] ?? 8);
  if (!Number.isInteger(fsBlockSize) || fsBlockSize <= 0) throw new Error(`dumpe2fs gave no block size for ${device}`);

  // The fixed structures of each block group, as dumpe2fs lays them out.
  const fixed = new Map<number, string>();
  const mark = (re: RegExp, what: string) => {
    for (const [a, b] of ranges(dump, re)) for (let x = a; x <= b; x++) fixed.set(x, what);
  };
  mark(/(?:Primary|Backup) superblock at (\d+)()/g, 'superblock');
  mark(/Group descriptors at (\d+)-(\d+)/g, 'group descriptors');
  mark(/Reserved GDT blocks at (\d+)-(\d+)/g, 'reserved GDT blocks');
  mark(/Block bitmap at (\d+)()/g, 'block bitmap');
  mark(/Inode bitmap at (\d+)()/g, 'inode bitmap');
  mark(/Inode table at (\d+)-(\d+)/g, 'inode table');
  if (fsBlockSize === 1024) fixed.set(0, 'boot block (before the superblock)');
  const free = new Set<number>();
  for (const line of dump.matchAll(/^\s+Free blocks: (.+)$/gm)) {
    for (const [a, b] of ranges(line[1]!, /(\d+)(?:-(\d+))?/g)) for (let x = a; x <= b; x++) free.add(x);
  }

  const perDriver = new Map(driverBlocks.map((d) => [d, fsBlocksOf(d, driverBlockSize, fsBlockSize)]));
  const ask = [...new Set([...perDriver.values()].flat())].filter((b) => !fixed.has(b));
  // icheck: which inode's block map (data, extent tree, xattr block) holds each block.
  const inodeOf = new Map<number, number>();
  for (let i = 0; i < ask.length; i += 1000) {
    const out = run('debugfs', ['-R', `icheck ${ask.slice(i, i + 1000).join(' ')}`, device]);
    for (const m of out.matchAll(/^(\d+)\t(\d+)$/gm)) inodeOf.set(Number(m[1]), Number(m[2]));
  }
  // The type and a path of each inode met (ncheck names files; stat says what they are).
  const inodes = [...new Set(inodeOf.values())].filter((i) => i !== journalInode);
  const typeOf = new Map<number, string>();
  const pathOf = new Map<number, string>();
  if (inodes.length > 0) {
    const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-debugfs-'));
    try {
      const cmds = path.join(scratch, 'cmds');
      fs.writeFileSync(cmds, `${inodes.map((i) => `stat <${i}>`).join('\n')}\nncheck ${inodes.join(' ')}\n`);
      const out = run('debugfs', ['-f', cmds, device], {
        ...process.env,
        PAGER: '__none__',
        DEBUGFS_PAGER: '__none__',
      });
      for (const m of out.matchAll(/^Inode: (\d+)\s+Type: ([\w ]+?)\s{2,}/gm)) typeOf.set(Number(m[1]), m[2]!);
      for (const m of out.matchAll(/^(\d+)\t(\/.*)$/gm)) if (!pathOf.has(Number(m[1]))) pathOf.set(Number(m[1]), m[2]!);
    } finally {
      fs.rmSync(scratch, { recursive: true, force: true });
    }
  }

  const ownerOf = (b: number): BlockOwner => {
    const structure = fixed.get(b);
    if (structure) return { role: 'metadata', what: structure };
    const inode = inodeOf.get(b);
    if (inode === journalInode) return { role: 'journal', what: `journal (inode ${inode})` };
    if (inode === 7) return { role: 'metadata', what: 'resize inode' };
    if (inode !== undefined) {
      const type = typeOf.get(inode);
      // ncheck prints top-level names with a doubled slash; the root directory (inode 2) has no entry.
      const where = inode === 2 ? '/' : (pathOf.get(inode)?.replace(/^\/+/, '/') ?? `inode ${inode}`);
      if (type === 'directory') return { role: 'directory', what: where };
      if (type === 'regular') return { role: 'file data', what: where };
      return { role: 'metadata', what: `inode ${inode} (${type ?? 'unknown type'})` };
    }
    if (free.has(b)) return { role: 'free', what: 'free block' };
    return { role: 'metadata', what: 'in use, owned by no inode' };
  };
  return {
    fsBlockSize,
    owners: new Map([...perDriver].map(([d, bs]) => [d, bs.map((b) => ({ fsBlock: b, ...ownerOf(b) }))])),
  };
}

/** xfs_db block types that are the log, free space, file data and directories; every other type is metadata. */
const XFS_ROLES: Record<string, BlockRole> = {
  log: 'journal',
  free1: 'free',
  free2: 'free',
  data: 'file data',
  dir: 'directory',
};

function xfsOwners(device: string, driverBlocks: readonly number[], driverBlockSize: number): BlockOwners {
  const sb = run('xfs_db', ['-r', '-c', 'sb 0', '-c', 'p blocksize', device]);
  const fsBlockSize = Number(/blocksize = (\d+)/.exec(sb)?.[1]);
  if (!Number.isInteger(fsBlockSize) || fsBlockSize <= 0) throw new Error(`xfs_db gave no block size for ${device}`);
  const perDriver = new Map(driverBlocks.map((d) => [d, fsBlocksOf(d, driverBlockSize, fsBlockSize)]));
  const all = [...new Set([...perDriver.values()].flat())];
  const owner = new Map<number, BlockOwner>();
  // blockget walks the whole filesystem once (-n: with file names); then blockuse answers per block,
  // positioned by 512-byte sector address (xfs's own block numbers skip between allocation groups).
  for (let i = 0; i < all.length; i += 500) {
    const chunk = all.slice(i, i + 500);
    const args = ['-r', '-c', 'blockget -n'];
    for (const b of chunk) args.push('-c', `daddr ${(b * fsBlockSize) / 512}`, '-c', 'blockuse -n');
    const lines = run('xfs_db', [...args, device])
      .split('\n')
      .filter((l) => l.startsWith('block '));
    if (lines.length !== chunk.length) {
      throw new Error(`xfs_db blockuse answered ${lines.length} lines for ${chunk.length} blocks`);
    }
    for (const [j, line] of lines.entries()) {
      const m = /type (\S+)(?: inode (\d+)(?: (.+))?)?/.exec(line);
      const type = m?.[1] ?? 'unknown';
      const role = XFS_ROLES[type] ?? 'metadata';
      const what = role === 'file data' || role === 'directory' ? `/${m?.[3] ?? `inode ${m?.[2]}`}` : type;
      owner.set(chunk[j]!, { role, what });
    }
  }
  return {
    fsBlockSize,
    owners: new Map([...perDriver].map(([d, bs]) => [d, bs.map((b) => ({ fsBlock: b, ...owner.get(b)! }))])),
  };
}
