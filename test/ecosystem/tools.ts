/**
 * Where the upstream programs built by scripts/ecosystem/build.sh are, from the pins in
 * scripts/ecosystem/versions.json, and the suites that need them: skipped with the reason when a
 * program is missing, failing instead under CI=true (CI builds them first).
 */
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

/** Path of a built program, or undefined when build.sh has not built it (completely) here. */
export function toolPath(binary: string): string | undefined {
  const [name, c] = componentOf(binary);
  const dir = path.join(ecosystemCache(), `${name}-${c.version}`);
  const bin = path.join(dir, 'bin', binary);
  return fs.existsSync(path.join(dir, 'complete')) && fs.existsSync(bin) ? bin : undefined;
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
      return `${b} (${name} ${c.version}) is not built in ${ecosystemCache()}: run scripts/ecosystem/build.sh ${name}`;
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
