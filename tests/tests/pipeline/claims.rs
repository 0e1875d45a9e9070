//! The apply transaction's claim on real Postgres: an event is claimed by marking its inbox
//! row processed, exactly once however many transactions try at the same time (a rolled-back
//! claim leaves it to the next), `processed_events` shows what was claimed and committed, and a
//! link releasing deferred events never waits for (or deadlocks with) a transaction that
//! claimed one of them and waits for the link's lock.

use std::time::Duration;

use e2e::harness::{TestDb, unique_tag};
use shared::db::{organizations, webhook_events};

async fn stored(db: &TestDb, id: &str) {
    let payload =
        format!(r#"{{"id":"{id}","type":"invoice.paid","created":1,"data":{{"object":{{}}}}}}"#);
    let event = webhook_events::NewEvent {
        id,
        event_type: "invoice.paid",
        livemode: false,
        api_version: None,
        stripe_created: chrono::Utc::now(),
        payload: payload.as_bytes(),
    };
    assert!(
        webhook_events::insert(&db.pool, &event)
            .await
            .expect("insert")
    );
}

async fn claimed_in_processed_events(db: &TestDb, id: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM processed_events WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("processed_events")
}

#[tokio::test]
async fn a_concurrent_claim_waits_and_gets_the_event_only_if_the_first_rolls_back() {
    let db = TestDb::new().await;
    let (kept, dropped) = (
        format!("evt_{}_kept", unique_tag()),
        format!("evt_{}_dropped", unique_tag()),
    );
    stored(&db, &kept).await;
    stored(&db, &dropped).await;

    for (id, commit) in [(&kept, true), (&dropped, false)] {
        let mut first = db.pool.begin().await.expect("begin");
        let claims = webhook_events::get_and_claim(&mut *first, &[id.as_str()])
            .await
            .expect("claim");
        assert!(claims[0].1, "the first claim gets {id}");
        let pool = db.pool.clone();
        let id2 = id.clone();
        let second = tokio::spawn(async move {
            let mut tx = pool.begin().await.expect("begin");
            let claims = webhook_events::get_and_claim(&mut *tx, &[id2.as_str()])
                .await
                .expect("claim");
            tx.commit().await.expect("commit");
            claims[0].1
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !second.is_finished(),
            "the second claim waits for the first transaction"
        );
        if commit {
            first.commit().await.expect("commit");
        } else {
            first.rollback().await.expect("rollback");
        }
        let second_claimed = second.await.expect("second claim");
        assert_eq!(
            second_claimed, !commit,
            "{id}: claimed by the second only after a rollback"
        );
        assert_eq!(
            claimed_in_processed_events(&db, id).await,
            1,
            "{id} processed once"
        );
    }
}

#[tokio::test]
async fn releasing_a_customer_skips_an_event_claimed_by_a_transaction_waiting_for_its_link() {
    let db = TestDb::new().await;
    let customer = format!("cus_{}", unique_tag());
    let id = format!("evt_{}_waiting", unique_tag());
    stored(&db, &id).await;
    let deferral = webhook_events::Deferral {
        id: &id,
        customer_id: Some(&customer),
        reason: "no organization yet",
        retry_at: chrono::Utc::now(),
    };
    webhook_events::mark_deferred(&db.pool, &[deferral])
        .await
        .expect("defer");

    // An apply transaction claims the deferred event, then needs the customer's link lock.
    let mut applier = db.pool.begin().await.expect("begin");
    let claims = webhook_events::get_and_claim(&mut *applier, &[id.as_str()])
        .await
        .expect("claim");
    assert!(claims[0].1);

    // A link holds that lock and releases the customer's deferred events meanwhile.
    let mut linker = db.pool.begin().await.expect("begin");
    organizations::lock_customer_links(&mut *linker, &[customer.as_str()])
        .await
        .expect("lock");
    let released = tokio::time::timeout(
        Duration::from_secs(5),
        webhook_events::release_deferred(&mut *linker, &[customer.as_str()]),
    )
    .await
    .expect("the release does not wait for the claimed row")
    .expect("release");
    assert!(
        released.is_empty(),
        "the claimed event is the claimer's: {released:?}"
    );
    let customer2 = customer.clone();
    let waiting = tokio::spawn(async move {
        organizations::lock_customer_links(&mut *applier, &[customer2.as_str()])
            .await
            .expect("lock");
        applier.commit().await.expect("commit");
    });
    linker.commit().await.expect("commit");
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the claimer gets the lock once the link commits")
        .expect("claimer");
    assert_eq!(claimed_in_processed_events(&db, &id).await, 1);
}
