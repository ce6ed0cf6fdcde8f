/**
 * Where the upstream programs built by scripts/ecosystem/build.sh are, from the pins in
 * scripts/ecosystem/versions.json, and the suites that need them: skipped with the reason when a
 * program is missing, failing instead under CI=true (CI builds them first).
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, it } from 'vitest';
import { REPO_ROOT } from '../support/test-driver.js';

export interface Component {
  module: string;
  version: string;
  localVersion?: string;
  binaries: Record<string, string>;
  /** The module (and version) whose directory `dir` holds the component's CRDs. */
  crds?: { module: string; version: string; dir: string };
  images?: Record<string, string>;
  buildable?: boolean;
  /** The component whose throwaway module builds this one too (scripts/ecosystem/group.mjs). */
  buildWith?: string;
  /** A program of this repository: the directory it is built from. */
  source?: string;
}

export const VERSIONS_FILE = path.join(REPO_ROOT, 'scripts/ecosystem/versions.json');
export const COMPONENTS = (
  JSON.parse(fs.readFileSync(VERSIONS_FILE, 'utf8')) as { components: Record<string, Component> }
).components;

/** The cache build.sh installs into (same rule as the script). */
export function ecosystemCache(): string {
  const env = process.env;
  return (
    env.CBT_CSI_ECOSYSTEM_CACHE ??
    path.join(env.XDG_CACHE_HOME ?? path.join(os.homedir(), '.cache'), 'cbt-csi-ecosystem')
  );
}

/** The component that builds a program. */
export function componentOf(binary: string): [string, Component] {
  const found = Object.entries(COMPONENTS).find(([, c]) => binary in c.binaries);
  if (!found) throw new Error(`no component in versions.json builds ${binary}`);
  return found;
}

/** The hash build.sh records for a program of this repository (scripts/ecosystem/source-hash.mjs). */
function sourceHash(source: string): string {
  const r = spawnSync(process.execPath, [path.join(REPO_ROOT, 'scripts/ecosystem/source-hash.mjs'), source], {
    encoding: 'utf8',
  });
  if (r.status !== 0) throw new Error(`source-hash.mjs ${source}: ${r.stderr}`);
  return r.stdout.trim();
}

/**
 * Path of a built program, or undefined when build.sh has not built it (completely) here, or built it
 * from other sources than the repository's (a program of this repository).
 */
export function toolPath(binary: string): string | undefined {
  const [name, c] = componentOf(binary);
  const dir = path.join(ecosystemCache(), `${name}-${c.version}`);
  const bin = path.join(dir, 'bin', binary);
  if (!fs.existsSync(path.join(dir, 'complete')) || !fs.existsSync(bin)) return undefined;
  if (c.source) {
    const spec = fs.readFileSync(path.join(dir, 'spec.json'), 'utf8');
    if (!spec.includes(`source-sha256 ${sourceHash(path.join(REPO_ROOT, c.source))}`)) return undefined;
  }
  return bin;
}

/** Like toolPath, but throws: for use inside a suite that checked with ecosystemSuite. */
export function tool(binary: string): string {
  const p = toolPath(binary);
  if (!p) throw new Error(`${binary} is not built: run scripts/ecosystem/build.sh ${componentOf(binary)[0]}`);
  return p;
}

/** Why a suite needing these programs (and, if `root`, root with FUSE and loop devices) cannot run, or undefined. */
export function missingTools(binaries: readonly string[]): string | undefined {
  for (const b of binaries) {
    if (!toolPath(b)) {
      const [name, c] = componentOf(b);
      const state = c.source ? 'not built from the current sources' : 'not built';
      return `${b} (${name} ${c.version}) is ${state} in ${ecosystemCache()}: run scripts/ecosystem/build.sh ${name}`;
    }
  }
  return undefined;
}

/** describe() when `missing` is undefined; else skipped with the reason, or one failing test under CI=true. */
export function suiteUnless(missing: string | undefined, name: string, body: () => void): void {
  if (!missing) describe(name, body);
  else if (process.env.CI === 'true') {
    describe(name, () =>
      it(`has what it needs (CI=true): ${missing}`, () => {
        throw new Error(missing);
      }),
    );
  } else describe.skip(`${name} — skipped: ${missing}`, body);
}
