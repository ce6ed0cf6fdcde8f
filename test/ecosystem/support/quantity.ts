/** Kubernetes resource quantities as bytes: plain integers and the binary (Ki…Ei) and decimal (k…E) suffixes. */
const SUFFIX: Record<string, number> = {
  '': 1,
  Ki: 2 ** 10,
  Mi: 2 ** 20,
  Gi: 2 ** 30,
  Ti: 2 ** 40,
  Pi: 2 ** 50,
  Ei: 2 ** 60,
  k: 1e3,
  M: 1e6,
  G: 1e9,
  T: 1e12,
  P: 1e15,
  E: 1e18,
};

export function parseQuantity(q: string): number {
  const m = /^(\d+)([KMGTPE]i|[kMGTPE])?$/.exec(q);
  if (!m) throw new Error(`not a whole-number byte quantity: ${q}`);
  return Number(m[1]) * SUFFIX[m[2] ?? '']!;
}
