/**
 * Delegated authentication and authorization, as every extension API server does it: bearer
 * tokens are checked with a TokenReview and requests are authorized with a SubjectAccessReview,
 * both against kube-apiserver, with answers cached for a short time (as kube-apiserver's own
 * webhook authenticator and delegating authorizer do). The calls to kube-apiserver sit behind two
 * narrow interfaces so that the caches and rules are tested without a cluster.
 */
import { createHash } from 'node:crypto';
import type { AuthenticationResult, Authenticator, AuthorizationDecision, Authorizer, RequestAttributes, UserInfo } from './types.ts';

export interface TokenReviewResult {
  readonly authenticated: boolean;
  readonly user?: UserInfo;
  readonly error?: string;
}

/** Posts a TokenReview; rejects only when kube-apiserver cannot be asked. */
export interface TokenReviewer {
  review(token: string): Promise<TokenReviewResult>;
}

export interface AccessReviewResult {
  readonly allowed: boolean;
  readonly denied?: boolean;
  readonly reason?: string;
  readonly evaluationError?: string;
}

/** Posts a SubjectAccessReview; rejects only when kube-apiserver cannot be asked. */
export interface AccessReviewer {
  review(attrs: RequestAttributes): Promise<AccessReviewResult>;
}

class TtlCache<V> {
  private readonly entries = new Map<string, { value: V; expires: number }>();
  private readonly max: number;
  private readonly now: () => number;
  constructor(max: number, now: () => number) {
    this.max = max;
    this.now = now;
  }
  get(key: string): V | undefined {
    const e = this.entries.get(key);
    if (!e) return undefined;
    if (e.expires <= this.now()) {
      this.entries.delete(key);
      return undefined;
    }
    return e.value;
  }
  set(key: string, value: V, ttlMs: number): void {
    if (ttlMs <= 0) return;
    this.entries.delete(key);
    this.entries.set(key, { value, expires: this.now() + ttlMs });
    if (this.entries.size > this.max) this.entries.delete(this.entries.keys().next().value!);
  }
  get size(): number {
    return this.entries.size;
  }
}

export interface TokenReviewOptions {
  readonly successTtlMs?: number;
  readonly failureTtlMs?: number;
  readonly now?: () => number;
}

/**
 * Bearer tokens through TokenReview. Tokens are cached by their SHA-256, never stored or logged
 * in the clear; an error reaching kube-apiserver is not cached.
 */
export function tokenReviewAuthenticator(reviewer: TokenReviewer, o: TokenReviewOptions = {}): Authenticator & { readonly cacheSize: number } {
  const cache = new TtlCache<AuthenticationResult>(10_000, o.now ?? Date.now);
  const ok = o.successTtlMs ?? 10_000;
  const fail = o.failureTtlMs ?? 10_000;
  return {
    get cacheSize() {
      return cache.size;
    },
    async authenticate({ headers }) {
      const auth = headers['authorization'];
      const m = typeof auth === 'string' ? /^Bearer\s+(\S+)\s*$/i.exec(auth) : null;
      if (!m) return { authenticated: false };
      const key = createHash('sha256').update(m[1]!).digest('hex');
      const hit = cache.get(key);
      if (hit) return hit;
      let r: TokenReviewResult;
      try {
        r = await reviewer.review(m[1]!);
      } catch (err) {
        return { authenticated: false, reason: `the token could not be checked: ${(err as Error).message}` };
      }
      const result: AuthenticationResult =
        r.authenticated && r.user
          ? { authenticated: true, user: r.user }
          : { authenticated: false, reason: `the token was not accepted${r.error ? `: ${r.error}` : ''}` };
      cache.set(key, result, result.authenticated ? ok : fail);
      return result;
    },
  };
}

export interface AccessReviewOptions {
  readonly allowTtlMs?: number;
  readonly denyTtlMs?: number;
  readonly now?: () => number;
  /** Groups allowed everything without asking (kube-apiserver's `system:masters`). */
  readonly privilegedGroups?: readonly string[];
}

function attributesKey(a: RequestAttributes): string {
  return JSON.stringify([
    a.user.username,
    a.user.uid ?? '',
    [...a.user.groups].sort(),
    a.user.extra ? Object.entries(a.user.extra).sort(([x], [y]) => x.localeCompare(y)) : [],
    a.verb,
    a.isResourceRequest ? [a.apiGroup, a.apiVersion, a.resource, a.subresource ?? '', a.name ?? ''] : a.path,
  ]);
}

/**
 * Authorization through SubjectAccessReview; allowed and denied answers are cached separately with
 * their own lifetimes. When kube-apiserver cannot be asked, the request is denied (fail closed)
 * with a reason saying so, and nothing is cached.
 */
export function subjectAccessReviewAuthorizer(reviewer: AccessReviewer, o: AccessReviewOptions = {}): Authorizer {
  const now = o.now ?? Date.now;
  const allowed = new TtlCache<AuthorizationDecision>(10_000, now);
  const denied = new TtlCache<AuthorizationDecision>(10_000, now);
  const privileged = o.privilegedGroups ?? ['system:masters'];
  return {
    async authorize(attrs) {
      if (attrs.user.groups.some((g) => privileged.includes(g))) return { allowed: true, reason: '' };
      const key = attributesKey(attrs);
      const hit = allowed.get(key) ?? denied.get(key);
      if (hit) return hit;
      let r: AccessReviewResult;
      try {
        r = await reviewer.review(attrs);
      } catch (err) {
        return { allowed: false, reason: `the authorization check could not be made: ${(err as Error).message}` };
      }
      const decision: AuthorizationDecision = {
        allowed: r.allowed && !r.denied,
        reason: r.reason || r.evaluationError || (r.allowed ? '' : 'no RBAC rule allows it'),
      };
      if (decision.allowed) allowed.set(key, decision, o.allowTtlMs ?? 10_000);
      else denied.set(key, decision, o.denyTtlMs ?? 10_000);
      return decision;
    },
  };
}
