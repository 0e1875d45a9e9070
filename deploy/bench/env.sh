# The settings every benchmark script shares (sourced, not run): local Redis, a bench-only
# webhook secret and token, the plan keys of tests' events, and Resend pointed at loopback's
# discard port (no benchmark sends an email; the worker requires the settings all the same,
# and nothing leaves the machine). Each script sets its own database and queue prefix.
export REDIS_URL="redis://127.0.0.1:6379"
export STRIPE_WEBHOOK_SECRET="whsec_bench_only_secret"
export INTERNAL_API_TOKEN="bench-internal-token"
export STRIPE_BASIC_PRICE_KEY="price_basic_monthly"
export STRIPE_PREMIUM_PRICE_KEY="price_premium_monthly"
export STRIPE_ENTERPRISE_PRODUCT_KEY="prod_enterprise"
export RESEND_API_KEY="re_bench_only"
export RESEND_BASE_URL="http://127.0.0.1:9"
export EMAIL_FROM="billing@example.com"
export ENTERPRISE_SALES_EMAIL="sales@example.com"
export RUST_LOG="${RUST_LOG:-warn}"
