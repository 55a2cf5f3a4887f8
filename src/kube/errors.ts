/**
 * Small helpers for talking to kube-apiserver through @kubernetes/client-node: errors as one line
 * a person can read (never a response body or an object, which may hold secrets), and deadlines.
 */

/** The HTTP status of a failed @kubernetes/client-node call (`code` or `statusCode`), if any. */
export function kubeStatusCode(err: unknown): number | undefined {
  const e = err as { code?: unknown; statusCode?: unknown };
  return typeof e.code === 'number' ? e.code : typeof e.statusCode === 'number' ? e.statusCode : undefined;
}

/** One line for logs: the HTTP status and kube-apiserver's message, never a body or an object. */
export function describeKubeError(err: unknown): string {
  const e = err as { body?: unknown; message?: unknown; name?: unknown };
  const status = kubeStatusCode(err);
  if (status !== undefined) {
    let message = '';
    try {
      const body = typeof e.body === 'string' ? (JSON.parse(e.body) as unknown) : e.body;
      const m = (body as { message?: unknown } | undefined)?.message;
      if (typeof m === 'string') message = m;
    } catch {
      // not a Status body
    }
    return `kube-apiserver answered ${status}${message ? `: ${message}` : ''}`;
  }
  let message = typeof e.message === 'string' ? e.message : String(err);
  // undici's "fetch failed" says why in its cause (e.g. connect ECONNREFUSED 127.0.0.1:6443).
  const cause = (err as { cause?: { message?: unknown } }).cause;
  if (typeof cause?.message === 'string' && cause.message !== '') message += ` (${cause.message})`;
  // A transport error's message names the URL at most; cut it short anyway.
  return message.length > 300 ? `${message.slice(0, 300)}…` : message;
}

/** Rejects when `p` has not settled within `ms`. */
export function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what} timed out after ${ms} ms`)), ms);
    }),
  ]);
}
