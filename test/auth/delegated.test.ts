/**
 * TokenReview and SubjectAccessReview rules and caches, with fakes of the two narrow reviewer
 * interfaces and a controllable clock.
 */
import t from 'tap';
import { subjectAccessReviewAuthorizer, tokenReviewAuthenticator, type AccessReviewer, type TokenReviewer } from '../../src/auth/delegated.ts';
import type { RequestAttributes } from '../../src/auth/types.ts';

t.test('a bearer token is checked by TokenReview and the answer cached for the TTL', async (t) => {
  let now = 0;
  const calls: string[] = [];
  const reviewer: TokenReviewer = {
    review: async (token) => {
      calls.push(token);
      return token === 'good' ? { authenticated: true, user: { username: 'system:serviceaccount:ns:sa', groups: ['system:serviceaccounts'] } } : { authenticated: false, error: 'invalid bearer token' };
    },
  };
  const a = tokenReviewAuthenticator(reviewer, { successTtlMs: 10_000, failureTtlMs: 2_000, now: () => now });
  const req = (token: string) => ({ headers: { authorization: `Bearer ${token}` }, socket: undefined });
  t.match(await a.authenticate(req('good')), { authenticated: true, user: { username: 'system:serviceaccount:ns:sa' } });
  await a.authenticate(req('good'));
  t.same(calls, ['good'], 'the second request is served from the cache');
  now = 10_001;
  await a.authenticate(req('good'));
  t.same(calls, ['good', 'good'], 'and asked again after the TTL');
  t.match(await a.authenticate(req('bad')), { authenticated: false, reason: /invalid bearer token/ });
  await a.authenticate(req('bad'));
  t.equal(calls.filter((c) => c === 'bad').length, 1, 'failures are cached too');
  t.same(await a.authenticate({ headers: {}, socket: undefined }), { authenticated: false }, 'no token: not this authenticator');
});

t.test('a TokenReview that cannot be made is not cached', async (t) => {
  let fail = true;
  let calls = 0;
  const a = tokenReviewAuthenticator({
    review: async () => {
      calls++;
      if (fail) throw new Error('connection refused');
      return { authenticated: true, user: { username: 'u', groups: [] } };
    },
  });
  const req = { headers: { authorization: 'Bearer x' }, socket: undefined };
  t.match(await a.authenticate(req), { authenticated: false, reason: /could not be checked: connection refused/ });
  fail = false;
  t.match(await a.authenticate(req), { authenticated: true });
  t.equal(calls, 2);
});

const attrs = (verb: string, user = 'jane', groups: string[] = ['dev']): RequestAttributes => ({
  user: { username: user, groups },
  verb,
  isResourceRequest: true,
  path: '/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidations',
  apiGroup: 'kmm.sigs.x-k8s.io',
  apiVersion: 'v1beta2',
  resource: 'preflightvalidations',
});

t.test('SubjectAccessReview answers: allowed and denied cached separately with their own TTLs', async (t) => {
  let now = 0;
  const asked: string[] = [];
  const reviewer: AccessReviewer = {
    review: async (a) => {
      asked.push(a.verb);
      return a.verb === 'get' ? { allowed: true } : { allowed: false, reason: 'RBAC: no rule' };
    },
  };
  const z = subjectAccessReviewAuthorizer(reviewer, { allowTtlMs: 10_000, denyTtlMs: 1_000, now: () => now });
  t.same(await z.authorize(attrs('get')), { allowed: true, reason: '' });
  t.same(await z.authorize(attrs('delete')), { allowed: false, reason: 'RBAC: no rule' });
  await z.authorize(attrs('get'));
  await z.authorize(attrs('delete'));
  t.same(asked, ['get', 'delete']);
  now = 1_500;
  await z.authorize(attrs('get'));
  await z.authorize(attrs('delete'));
  t.same(asked, ['get', 'delete', 'delete'], 'the denial expired first');
  await z.authorize(attrs('get', 'other'));
  t.equal(asked.length, 4, 'another user is another cache entry');
});

t.test('system:masters is allowed without asking; an unreachable reviewer denies without caching', async (t) => {
  let calls = 0;
  let fail = true;
  const z = subjectAccessReviewAuthorizer({
    review: async () => {
      calls++;
      if (fail) throw new Error('timed out');
      return { allowed: true };
    },
  });
  t.same(await z.authorize(attrs('delete', 'admin', ['system:masters'])), { allowed: true, reason: '' });
  t.equal(calls, 0);
  t.match(await z.authorize(attrs('list')), { allowed: false, reason: /could not be made: timed out/ });
  fail = false;
  t.match(await z.authorize(attrs('list')), { allowed: true });
});
