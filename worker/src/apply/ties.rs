//! Same-second ties settled by Stripe: an event whose subscription status ties the stored
//! one within the same second (and the Stripe API is configured) is left out of its batch's
//! transaction. Once that transaction has committed, each such subscription is fetched (no
//! lock is held during the calls; a batch's subscriptions concurrently, the client bounding
//! their number and rate) and the events are applied again with Stripe's answer, in one more
//! transaction. A failed fetch fails its event alone.

use std::collections::HashMap;

use futures::future::join_all;
use shared::billing::subscription::Snapshot;
use shared::stripe;
use shared::stripe_api::StripeApiError;

use super::decide::Refetched;
use super::{ApplyError, ApplyOptions, Deps, Pass, apply_once};

/// Settles the events of `results` left to be refetched (`Pass::Refetch`), in place.
/// `event_ids` are the ids the results answer, in the same order. An `Err` is the second
/// transaction's failure.
pub(super) async fn settle(
    deps: &Deps,
    event_ids: &[&str],
    options: ApplyOptions,
    results: &mut [Pass],
) -> Result<(), ApplyError> {
    let waiting: Vec<(usize, String)> = results
        .iter()
        .enumerate()
        .filter_map(|(at, r)| match r {
            Pass::Refetch(subscription_id) => Some((at, subscription_id.clone())),
            Pass::Done(_) => None,
        })
        .collect();
    if waiting.is_empty() {
        return Ok(());
    }
    let mut distinct: Vec<&str> = waiting.iter().map(|(_, id)| id.as_str()).collect();
    distinct.sort_unstable();
    distinct.dedup();
    let fetched = join_all(distinct.iter().map(|id| fetch_snapshot(deps, id))).await;
    let mut refetched = Refetched::new();
    let mut failed = HashMap::new();
    for (id, result) in distinct.into_iter().zip(fetched) {
        match result {
            Ok(snapshot) => {
                refetched.insert(id.to_owned(), snapshot);
            }
            Err(e) => {
                failed.insert(id, e);
            }
        }
    }
    let mut again = Vec::new();
    for (at, subscription_id) in &waiting {
        if refetched.contains_key(subscription_id) {
            again.push(*at);
            continue;
        }
        // A failed fetch fails its subscription's first event with Stripe's answer; another
        // event of that subscription asks again.
        let outcome = match failed.remove(subscription_id.as_str()) {
            Some(e) => Err(e),
            None => fetch_snapshot(deps, subscription_id).await.map(|snapshot| {
                refetched.insert(subscription_id.clone(), snapshot);
            }),
        };
        match outcome {
            Ok(()) => again.push(*at),
            Err(e) => results[*at] = Pass::Done(Err(e)),
        }
    }
    let ids: Vec<&str> = again.iter().map(|at| event_ids[*at]).collect();
    let second = apply_once(deps, &ids, options, &refetched).await?;
    for (at, pass) in again.into_iter().zip(second) {
        results[at] = match pass {
            // Tied again with a newer status that appeared meanwhile: retried later.
            Pass::Refetch(id) => Pass::Done(Err(ApplyError::TieMoved(id))),
            done => done,
        };
    }
    Ok(())
}

/// Fetches a subscription from Stripe, outside any transaction.
async fn fetch_snapshot(deps: &Deps, subscription_id: &str) -> Result<Snapshot, ApplyError> {
    let api = deps.stripe.as_ref().ok_or(ApplyError::Stopped)?;
    let subscription = api.subscription(subscription_id).await?;
    let snapshot = stripe::subscription_snapshot(&subscription, &deps.plans).ok_or_else(|| {
        StripeApiError::Decode {
            path: format!("/v1/subscriptions/{subscription_id}"),
            reason: format!("unknown subscription status {:?}", subscription.status),
        }
    })?;
    Ok(snapshot)
}
