/**
 * The I/O limit parameters, `maxIops` and `maxBandwidth`: accepted in StorageClass parameters and in
 * mutable_parameters (mutable-parameters.ts), stored as volume attributes in plain numbers, enforced by
 * the node data plane (src/dataplane/io-limiter.ts).
 */
import { InvalidArgumentError } from '../../storage-engine/index.js';
import { ATTR_MAX_BANDWIDTH, ATTR_MAX_IOPS } from '../dataplane/io-limiter.js';

/** Parameter keys of the I/O limits. */
export const PARAM_MAX_IOPS = 'maxIops';
export const PARAM_MAX_BANDWIDTH = 'maxBandwidth';

/** Highest maxIops accepted: far above what one FUSE connection serves. */
export const MAX_IOPS_LIMIT = 10_000_000;
/** Lowest non-zero maxBandwidth: below it one 1 MiB request would wait longer than kernels and pods tolerate. */
export const MIN_BANDWIDTH = 64 * 1024;

/** "500" requests a second; "0" for no limit. */
export function parseMaxIops(value: string): number {
  const v = value.trim();
  const n = /^\d{1,9}$/.test(v) ? Number(v) : Number.NaN;
  if (!(n >= 0 && n <= MAX_IOPS_LIMIT)) {
    throw new InvalidArgumentError(
      `${PARAM_MAX_IOPS} ${JSON.stringify(value.slice(0, 64))} must be a whole number of requests a second from 1 to ${MAX_IOPS_LIMIT}, or 0 for no limit`,
    );
  }
  return n;
}

const BANDWIDTH_UNITS: Readonly<Record<string, number>> = {
  '': 1,
  k: 1e3,
  K: 1e3,
  M: 1e6,
  G: 1e9,
  Ki: 1024,
  Mi: 1024 ** 2,
  Gi: 1024 ** 3,
};

/** Bytes a second: "8388608", "8Mi" (or "8MiB"), "10M", "512Ki", optionally followed by "/s"; "0" for no limit. */
export function parseMaxBandwidth(value: string): number {
  const m = /^(\d{1,15})(|k|K|M|G|Ki|Mi|Gi)B?(\/s)?$/.exec(value.trim());
  const n = m ? Number(m[1]) * BANDWIDTH_UNITS[m[2]!]! : Number.NaN;
  if (!(Number.isSafeInteger(n) && (n === 0 || n >= MIN_BANDWIDTH))) {
    throw new InvalidArgumentError(
      `${PARAM_MAX_BANDWIDTH} ${JSON.stringify(value.slice(0, 64))} must be bytes a second such as 8Mi, 100M or 524288, at least ${MIN_BANDWIDTH} (64Ki), or 0 for no limit`,
    );
  }
  return n;
}

/** The attributes the I/O limit parameters among `parameters` set (absent keys set nothing). */
export function ioLimitAttributes(parameters: Readonly<Record<string, string>>): Record<string, string> {
  const out: Record<string, string> = {};
  const iops = parameters[PARAM_MAX_IOPS];
  if (iops !== undefined) out[ATTR_MAX_IOPS] = String(parseMaxIops(iops));
  const bandwidth = parameters[PARAM_MAX_BANDWIDTH];
  if (bandwidth !== undefined) out[ATTR_MAX_BANDWIDTH] = String(parseMaxBandwidth(bandwidth));
  return out;
}
